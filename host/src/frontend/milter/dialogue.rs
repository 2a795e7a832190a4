//! The packet loop of one milter connection: read a packet, hand it to the
//! conversation, write its answer — or no answer, for the steps the MTA
//! agreed not to wait for.
//!
//! Packets are parsed and answers encoded by `miltr-common`; the loop is
//! ours because `miltr-server`'s always answers every command, so the
//! no-reply steps of milter protocol 6 (`SMFIP_NR_HDR`: Postfix sends every
//! header without waiting for a reply to each) cannot be negotiated with
//! it, because we acknowledge TCP segments at once only when nothing
//! will carry the ACK (see [`AckNow`]), not after every read, and because
//! its `Milter` trait (through `async_trait`) boxes a future for every
//! packet: [`Steps`] does not.

use bytes::BytesMut;
use miltr_common::ProtocolError;
use miltr_common::actions::{Action, Continue};
use miltr_common::commands::{Connect, Header, Helo, Macro, Mail, Recipient};
use miltr_common::decoding::ClientCommand;
use miltr_common::encoding::{ServerMessage, Writable};
use miltr_common::modifications::ModificationResponse;
use miltr_common::optneg::{Capability, OptNeg, Protocol};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::frames::{has_packet, next_packet};

/// Why a milter connection ended early.
#[derive(Debug, Error)]
pub enum DialogueError {
    /// Reading or writing failed (including the connection's deadlines).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The MTA sent a packet that does not parse, or is too large.
    #[error("malformed packet: {0}")]
    Protocol(#[from] ProtocolError),
    /// Option negotiation found nothing both sides speak.
    #[error("option negotiation: {0}")]
    Negotiation(String),
}

/// A connection that can send the ACK for what it has read at once rather
/// than after the kernel's delayed-ACK timer. Postfix does not disable
/// Nagle on its milter connections: after a packet that gets no reply (a
/// macro, an abort, a header under `SMFIP_NR_HDR`) its next small write
/// waits until that packet is acknowledged, 40 ms when the ACK is delayed.
/// A reply carries the ACK by itself, so only the silent steps need this.
pub trait AckNow {
    /// Acknowledges what was received, now.
    fn ack_now(&self);
}

/// What a milter does at each command the MTA sends. The steps that ask
/// the filters are `async`, their futures unboxed: `miltr-server`'s
/// `Milter` trait boxed one for every packet (~14 packets a message, five
/// of them futures of ~3.5 KB, too large for the allocator's per-thread
/// cache). The others only take note. Commands not here (DATA, end of
/// headers, body chunks, unknown commands: none of them negotiated) are
/// answered continue by [`run`] itself, and QUIT ends the connection.
pub trait Steps: Send {
    /// Our answer to the MTA's option negotiation (`SMFIC_OPTNEG`).
    fn option_negotiation(&mut self, theirs: OptNeg) -> Result<OptNeg, ProtocolError>;
    /// Macros the MTA defines for the next step (`SMFIC_MACRO`).
    fn macro_(&mut self, m: Macro);
    /// The client connected (`SMFIC_CONNECT`).
    fn connect(&mut self, c: Connect) -> impl Future<Output = Action> + Send;
    /// HELO or EHLO (`SMFIC_HELO`).
    fn helo(&mut self, h: Helo) -> impl Future<Output = Action> + Send;
    /// MAIL FROM (`SMFIC_MAIL`).
    fn mail(&mut self, m: Mail) -> impl Future<Output = Action> + Send;
    /// One RCPT TO (`SMFIC_RCPT`).
    fn rcpt(&mut self, r: Recipient) -> impl Future<Output = Action> + Send;
    /// One header of the message (`SMFIC_HEADER`).
    fn header(&mut self, h: Header) -> Action;
    /// End of message (`SMFIC_BODYEOB`): the answer and the modifications.
    fn end_of_body(&mut self) -> impl Future<Output = ModificationResponse> + Send;
    /// The transaction ended without a message (`SMFIC_ABORT`).
    fn abort(&mut self);
    /// The MTA keeps the connection for its next SMTP session
    /// (`SMFIC_QUIT_NC`).
    fn quit_nc(&mut self);
}

/// Serves one milter connection until the MTA quits or closes it.
/// `max_packet` bounds a packet's length (a larger one ends the connection
/// before anything is allocated for it).
pub async fn run<M, IO>(milter: &mut M, io: &mut IO, max_packet: usize) -> Result<(), DialogueError>
where
    M: Steps,
    IO: AsyncRead + AsyncWrite + AckNow + Unpin,
{
    let mut input = BytesMut::with_capacity(4096);
    let mut output = BytesMut::with_capacity(512);
    let mut protocol = Protocol::empty();
    let mut capabilities = Capability::all();
    loop {
        let Some(command) = next_packet(&mut input, max_packet)? else {
            if io.read_buf(&mut input).await? == 0 {
                return Ok(());
            }
            continue;
        };
        // Whether the MTA waits for an answer to this command.
        let answered = match command {
            ClientCommand::OptNeg(theirs) => {
                let ours = milter.option_negotiation(theirs).map_err(|e| DialogueError::Negotiation(e.to_string()))?;
                protocol = ours.protocol;
                capabilities = ours.capabilities;
                encode_optneg(&mut output, &ours, super::macro_lists(capabilities))?;
                true
            }
            ClientCommand::Macro(m) => {
                milter.macro_(m);
                false
            }
            ClientCommand::Connect(c) => answer(&mut output, protocol, Protocol::NR_CONNECT, milter.connect(c).await)?,
            ClientCommand::Helo(h) => answer(&mut output, protocol, Protocol::NR_HELO, milter.helo(h).await)?,
            ClientCommand::Mail(m) => answer(&mut output, protocol, Protocol::NR_MAIL, milter.mail(m).await)?,
            ClientCommand::Recipient(r) => answer(&mut output, protocol, Protocol::NR_RECIPIENT, milter.rcpt(r).await)?,
            ClientCommand::Header(h) => answer(&mut output, protocol, Protocol::NR_HEADER, milter.header(h))?,
            ClientCommand::Data(_) => answer(&mut output, protocol, Protocol::NR_DATA, Continue.into())?,
            ClientCommand::EndOfHeader(_) => answer(&mut output, protocol, Protocol::NR_END_OF_HEADER, Continue.into())?,
            ClientCommand::Body(_) => answer(&mut output, protocol, Protocol::NR_BODY, Continue.into())?,
            ClientCommand::Unknown(_) => answer(&mut output, protocol, Protocol::NR_UNKNOWN, Continue.into())?,
            ClientCommand::EndOfBody(_) => {
                let mut response = milter.end_of_body().await;
                // Only the modifications the MTA agreed to.
                response.filter_mods_by_caps(capabilities);
                for m in Vec::<ServerMessage>::from(response) {
                    encode(&mut output, &m)?;
                }
                true
            }
            ClientCommand::Abort(_) => {
                milter.abort();
                false
            }
            ClientCommand::Quit(_) => return Ok(()),
            ClientCommand::QuitNc(_) => {
                // The MTA keeps the connection for its next SMTP session.
                milter.quit_nc();
                false
            }
        };
        if answered {
            io.write_all(&output).await?;
            output.clear();
        } else if !has_packet(&input) {
            // Silent step and nothing more in hand: the MTA's next packet
            // may be waiting for our ACK.
            io.ack_now();
        }
    }
}

/// Encodes the answer to a command unless `no_reply` was negotiated for it;
/// true if one was encoded.
fn answer(output: &mut BytesMut, protocol: Protocol, no_reply: Protocol, action: Action) -> Result<bool, ProtocolError> {
    if protocol.contains(no_reply) {
        return Ok(false);
    }
    encode(output, &ServerMessage::Action(action))?;
    Ok(true)
}

/// Appends one packet: length, code, data.
fn encode(output: &mut BytesMut, m: &ServerMessage) -> Result<(), ProtocolError> {
    let len = u32::try_from(m.len() + 1).map_err(|_| ProtocolError::TooMuchData(m.len()))?;
    output.extend_from_slice(&len.to_be_bytes());
    output.extend_from_slice(&[m.code()]);
    m.write(output);
    Ok(())
}

/// Appends our negotiation reply: version, actions and protocol steps, then
/// `lists` (the macro lists we ask for, already encoded).
fn encode_optneg(output: &mut BytesMut, ours: &OptNeg, lists: &[u8]) -> Result<(), ProtocolError> {
    let len = 1 + 12 + lists.len();
    let len = u32::try_from(len).map_err(|_| ProtocolError::TooMuchData(len))?;
    output.extend_from_slice(&len.to_be_bytes());
    output.extend_from_slice(b"O");
    for word in [ours.version, ours.capabilities.bits(), ours.protocol.bits()] {
        output.extend_from_slice(&word.to_be_bytes());
    }
    output.extend_from_slice(lists);
    Ok(())
}
