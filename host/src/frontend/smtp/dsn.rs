//! Delivery status notification parameters (RFC 3461), checked and passed
//! on to the next hop: `RET` and `ENVID` with MAIL, `NOTIFY` and `ORCPT`
//! with RCPT. greyhook has no queue and sends no notices itself; the next
//! hop, which delivers or queues the message, does. Written by hand: four
//! parameters of a few rules each, bounded as RFC 3461 says.

/// Longest `ENVID` value (RFC 3461 4.4).
pub const MAX_ENVID: usize = 100;

/// Longest `ORCPT` parameter, keyword and `=` included (RFC 3461 4.2).
pub const MAX_ORCPT: usize = 500;

/// The MAIL parameters this module checks.
pub fn is_mail_param(key: &str) -> bool {
    key.eq_ignore_ascii_case("RET") || key.eq_ignore_ascii_case("ENVID")
}

/// Whether `s` is xtext (RFC 3461 4): printable ASCII but `+` and `=`,
/// which appear as `+` and two hex digits.
pub fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' if b.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) => i += 3,
            b'+' | b'=' => return false,
            33..=126 => i += 1,
            _ => return false,
        }
    }
    true
}

/// Checks one MAIL parameter `key=value` of RFC 3461 (`key` as
/// [`is_mail_param`] accepts), given the ones seen before it in the same
/// command (`seen`, updated): the parameter as it is passed on, or the
/// reply to the client.
pub fn mail_param(key: &str, value: &str, seen: &mut [bool; 2]) -> Result<String, &'static str> {
    if key.eq_ignore_ascii_case("RET") {
        if std::mem::replace(&mut seen[0], true) {
            return Err("501 5.5.4 Duplicate RET parameter\r\n");
        }
        return match value.to_ascii_uppercase().as_str() {
            v @ ("FULL" | "HDRS") => Ok(format!("RET={v}")),
            _ => Err("501 5.5.4 Bad RET parameter: FULL or HDRS\r\n"),
        };
    }
    if std::mem::replace(&mut seen[1], true) {
        return Err("501 5.5.4 Duplicate ENVID parameter\r\n");
    }
    if value.is_empty() || value.len() > MAX_ENVID || !is_xtext(value) {
        return Err("501 5.5.4 Bad ENVID parameter: xtext of at most 100 characters\r\n");
    }
    Ok(format!("ENVID={value}"))
}

/// Checks the parameters of a RCPT command: `NOTIFY` and `ORCPT` when
/// DSN is on (`enabled`), nothing else. With `utf8` (an SMTPUTF8
/// transaction) an `ORCPT` address may hold UTF-8 (RFC 6533). The
/// parameters as they are passed on (empty if none), or the reply to the
/// client.
pub fn rcpt_params(params: &str, enabled: bool, utf8: bool) -> Result<String, &'static str> {
    let (mut notify, mut orcpt) = (None, None);
    for p in params.split_whitespace() {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        if !enabled {
            return Err("555 5.5.4 Unsupported RCPT parameter\r\n");
        }
        if k.eq_ignore_ascii_case("NOTIFY") {
            if notify.is_some() {
                return Err("501 5.5.4 Duplicate NOTIFY parameter\r\n");
            }
            notify = Some(notify_value(v).ok_or("501 5.5.4 Bad NOTIFY parameter: NEVER, or SUCCESS, FAILURE and DELAY\r\n")?);
        } else if k.eq_ignore_ascii_case("ORCPT") {
            if orcpt.is_some() {
                return Err("501 5.5.4 Duplicate ORCPT parameter\r\n");
            }
            if p.len() > MAX_ORCPT || !orcpt_ok(v, utf8) {
                return Err("501 5.5.4 Bad ORCPT parameter: address type, \";\" and the address in xtext\r\n");
            }
            orcpt = Some(v);
        } else {
            return Err("555 5.5.4 Unsupported RCPT parameter\r\n");
        }
    }
    let mut out = String::new();
    if let Some(n) = notify {
        out.push_str("NOTIFY=");
        out.push_str(&n);
    }
    if let Some(o) = orcpt {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("ORCPT=");
        out.push_str(o);
    }
    Ok(out)
}

/// `NEVER`, or a list of `SUCCESS`, `FAILURE` and `DELAY` each at most
/// once (any case): upper-cased.
fn notify_value(v: &str) -> Option<String> {
    let v = v.to_ascii_uppercase();
    if v == "NEVER" {
        return Some(v);
    }
    let mut seen = [false; 3];
    for word in v.split(',') {
        let i = ["SUCCESS", "FAILURE", "DELAY"].iter().position(|w| *w == word)?;
        if std::mem::replace(&mut seen[i], true) {
            return None;
        }
    }
    Some(v)
}

/// `addr-type ";" xtext` (RFC 3461 4.2): an atom, then the address; with
/// `utf8`, UTF-8 may stand for itself in it (RFC 6533's unitext), still
/// with no spaces or controls.
fn orcpt_ok(v: &str, utf8: bool) -> bool {
    let Some((kind, address)) = v.split_once(';') else { return false };
    let atom = !kind.is_empty() && kind.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-');
    let text = if utf8 && !address.is_ascii() {
        address.chars().all(|c| !c.is_control() && !c.is_whitespace() && c != '=')
    } else {
        is_xtext(address)
    };
    atom && !address.is_empty() && text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_parameters() {
        let mut seen = [false; 2];
        assert_eq!(mail_param("ret", "hdrs", &mut seen).unwrap(), "RET=HDRS");
        assert!(mail_param("RET", "FULL", &mut seen).unwrap_err().contains("Duplicate"));
        assert_eq!(mail_param("ENVID", "QQ+2B314159", &mut seen).unwrap(), "ENVID=QQ+2B314159");
        assert!(mail_param("ENVID", "x", &mut seen).unwrap_err().contains("Duplicate"));
        for bad in ["", "a+", "a+2", "a=b", "a+b", "\u{e9}", &"x".repeat(101)] {
            assert!(mail_param("ENVID", bad, &mut [false; 2]).is_err(), "{bad:?}");
        }
        assert!(mail_param("RET", "ALL", &mut [false; 2]).is_err());
        assert!(is_mail_param("envid") && !is_mail_param("SIZE"));
    }

    #[test]
    fn rcpt_parameters() {
        assert_eq!(rcpt_params("", true, false).unwrap(), "");
        assert_eq!(
            rcpt_params("orcpt=rfc822;b+2B1@dest.test notify=success,failure", true, false).unwrap(),
            "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2B1@dest.test"
        );
        assert_eq!(rcpt_params("NOTIFY=never", true, false).unwrap(), "NOTIFY=NEVER");
        assert_eq!(rcpt_params("ORCPT=utf-8;m\u{fc}ller@dest.test", true, true).unwrap(), "ORCPT=utf-8;m\u{fc}ller@dest.test");
        for bad in [
            "NOTIFY=NEVER,SUCCESS",
            "NOTIFY=SUCCESS,SUCCESS",
            "NOTIFY=",
            "NOTIFY=SOMETIMES",
            "ORCPT=rfc822",
            "ORCPT=;a@b",
            "ORCPT=rfc822;",
            "ORCPT=utf-8;m\u{fc}ller@dest.test",
            "NOTIFY=DELAY NOTIFY=DELAY",
        ] {
            assert!(rcpt_params(bad, true, false).unwrap_err().starts_with("501"), "{bad:?}");
        }
        let long = format!("ORCPT=rfc822;{}", "a".repeat(490));
        assert!(rcpt_params(&long, true, false).is_err());
        assert!(rcpt_params(&long[..500], true, false).is_ok());
        assert!(rcpt_params("FOO=1", true, false).unwrap_err().starts_with("555"));
        assert!(rcpt_params("NOTIFY=SUCCESS", false, false).unwrap_err().starts_with("555"));
    }
}
