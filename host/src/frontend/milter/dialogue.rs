//! The packet loop of one milter connection: read a packet, hand it to the
//! conversation, write its answer — or no answer, for the steps the MTA
//! agreed not to wait for.
//!
//! Packets are parsed and answers encoded by `miltr-common`; the loop is
//! ours because `miltr-server`'s always answers every command, so the
//! no-reply steps of milter protocol 6 (`SMFIP_NR_HDR`: Postfix sends every
//! header without waiting for a reply to each) cannot be negotiated with
//! it, and because we acknowledge TCP segments at once only when nothing
//! will carry the ACK (see [`AckNow`]), not after every read.

use bytes::{Buf, BytesMut};
use miltr_common::ProtocolError;
use miltr_common::actions::Action;
use miltr_common::decoding::ClientCommand;
use miltr_common::encoding::{ServerMessage, Writable};
use miltr_common::optneg::{Capability, OptNeg, Protocol};
use miltr_server::Milter as MilterProtocol;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// Serves one milter connection until the MTA quits or closes it.
/// `max_packet` bounds a packet's length (a larger one ends the connection
/// before anything is allocated for it).
pub async fn run<M, IO>(milter: &mut M, io: &mut IO, max_packet: usize) -> Result<(), DialogueError>
where
    M: MilterProtocol<Error = std::convert::Infallible>,
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
                let ours = milter.option_negotiation(theirs).await.map_err(|e| DialogueError::Negotiation(e.to_string()))?;
                protocol = ours.protocol;
                capabilities = ours.capabilities;
                encode_optneg(&mut output, &ours, super::macro_lists(capabilities))?;
                true
            }
            ClientCommand::Macro(m) => {
                ok(milter.macro_(m).await);
                false
            }
            ClientCommand::Connect(c) => answer(&mut output, protocol, Protocol::NR_CONNECT, ok(milter.connect(c).await))?,
            ClientCommand::Helo(h) => answer(&mut output, protocol, Protocol::NR_HELO, ok(milter.helo(h).await))?,
            ClientCommand::Mail(m) => answer(&mut output, protocol, Protocol::NR_MAIL, ok(milter.mail(m).await))?,
            ClientCommand::Recipient(r) => answer(&mut output, protocol, Protocol::NR_RECIPIENT, ok(milter.rcpt(r).await))?,
            ClientCommand::Data(_) => answer(&mut output, protocol, Protocol::NR_DATA, ok(milter.data().await))?,
            ClientCommand::Header(h) => answer(&mut output, protocol, Protocol::NR_HEADER, ok(milter.header(h).await))?,
            ClientCommand::EndOfHeader(_) => answer(&mut output, protocol, Protocol::NR_END_OF_HEADER, ok(milter.end_of_header().await))?,
            ClientCommand::Body(b) => answer(&mut output, protocol, Protocol::NR_BODY, ok(milter.body(b).await))?,
            ClientCommand::Unknown(u) => answer(&mut output, protocol, Protocol::NR_UNKNOWN, ok(milter.unknown(u).await))?,
            ClientCommand::EndOfBody(_) => {
                let mut response = ok(milter.end_of_body().await);
                // Only the modifications the MTA agreed to.
                response.filter_mods_by_caps(capabilities);
                for m in Vec::<ServerMessage>::from(response) {
                    encode(&mut output, &m)?;
                }
                true
            }
            ClientCommand::Abort(_) => {
                ok(milter.abort().await);
                false
            }
            ClientCommand::Quit(_) => {
                ok(milter.quit().await);
                return Ok(());
            }
            ClientCommand::QuitNc(_) => {
                // The MTA keeps the connection for its next SMTP session.
                ok(milter.quit_nc().await);
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

/// The value of a conversation step that cannot fail.
fn ok<T>(r: Result<T, std::convert::Infallible>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => match e {},
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

/// Whether `input` holds a whole packet.
fn has_packet(input: &BytesMut) -> bool {
    input.len() >= 4 && input.len() - 4 >= u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize
}

/// Takes the next whole packet out of `input` and parses it; `None` if more
/// bytes are needed. A length over `max_packet` is an error before any of it
/// is read.
fn next_packet(input: &mut BytesMut, max_packet: usize) -> Result<Option<ClientCommand>, ProtocolError> {
    if input.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
    if len > max_packet {
        return Err(ProtocolError::TooMuchData(len));
    }
    if input.len() - 4 < len {
        input.reserve(4 + len - input.len());
        return Ok(None);
    }
    input.advance(4);
    let packet = input.split_to(len);
    Ok(Some(ClientCommand::parse(packet)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_cut_at_their_length_and_bounded() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 1, b'Q', 0, 0][..]);
        assert!(has_packet(&b));
        assert!(matches!(next_packet(&mut b, 1024), Ok(Some(ClientCommand::Quit(_)))));
        assert!(!has_packet(&b));
        assert!(matches!(next_packet(&mut b, 1024), Ok(None)));
        let mut big = BytesMut::from(&[0u8, 1, 0, 0][..]);
        assert!(next_packet(&mut big, 1024).is_err());
        let mut empty = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(next_packet(&mut empty, 1024).is_err());
    }
}
