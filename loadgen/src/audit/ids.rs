//! Message ids and W3C trace ids as the auditor keeps them (16 bytes each, no allocation) and as
//! reports print them. Malformed text from the network becomes all-zero bytes, never a panic.

/// Parses a UUID string into bytes (zero when malformed).
pub fn parse_id(text: &str) -> [u8; 16] {
    uuid::Uuid::parse_str(text).map(|u| *u.as_bytes()).unwrap_or_default()
}

/// Parses 32 hex digits into bytes (zero when malformed).
pub fn parse_trace(text: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let bytes = text.as_bytes();
    if bytes.len() != 32 {
        return out;
    }
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (hex(pair[0]), hex(pair[1])) {
            (Some(h), Some(l)) => out[i] = (h * 16 + l) as u8,
            _ => return [0; 16],
        }
    }
    out
}

/// Formats id bytes as a hyphenated UUID.
pub fn fmt_id(id: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*id).to_string()
}

/// Formats trace bytes as 32 lowercase hex digits; `None` for the all-zero (unknown) id.
pub fn fmt_trace(trace: &[u8; 16]) -> Option<String> {
    if trace == &[0; 16] {
        return None;
    }
    Some(trace.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_traces_round_trip() {
        let id = "018f0000-0000-7000-8000-00000000004d";
        assert_eq!(fmt_id(&parse_id(id)), id);
        let tr = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(fmt_trace(&parse_trace(tr)).as_deref(), Some(tr));
        assert_eq!(fmt_trace(&parse_trace("xyz")), None);
    }
}
