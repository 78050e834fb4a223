//! Validation of the names the protocol constrains: users, rooms and client message ids.

/// Longest user name, room name or client message id, in characters.
pub const MAX_NAME_LEN: usize = 64;

/// A user name: 1–64 characters from `A-Z a-z 0-9 _ - .`.
pub fn is_valid_user(name: &str) -> bool {
    valid_chars(name, |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A room name: 1–64 characters from `A-Z a-z 0-9 _ -` (no dots, so it is safe in NATS subjects).
pub fn is_valid_room(name: &str) -> bool {
    valid_chars(name, |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// A client message id: 1–64 characters of any kind except control characters.
pub fn is_valid_client_msg_id(id: &str) -> bool {
    let len = id.chars().count();
    (1..=MAX_NAME_LEN).contains(&len) && !id.chars().any(char::is_control)
}

fn valid_chars(name: &str, allowed: impl Fn(char) -> bool) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.chars().all(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users() {
        assert!(is_valid_user("alice.b-c_9"));
        assert!(is_valid_user(&"a".repeat(64)));
        assert!(!is_valid_user(&"a".repeat(65)));
        assert!(!is_valid_user(""));
        assert!(!is_valid_user("al ice"));
        assert!(!is_valid_user("é"));
    }

    #[test]
    fn rooms() {
        assert!(is_valid_room("general-2_x"));
        assert!(!is_valid_room("a.b"));
        assert!(!is_valid_room("a*"));
        assert!(!is_valid_room("a>"));
        assert!(!is_valid_room(""));
        assert!(!is_valid_room(&"r".repeat(65)));
    }

    #[test]
    fn client_msg_ids() {
        assert!(is_valid_client_msg_id("c-1"));
        assert!(is_valid_client_msg_id(&"é".repeat(64)));
        assert!(!is_valid_client_msg_id(""));
        assert!(!is_valid_client_msg_id("a\nb"));
        assert!(!is_valid_client_msg_id(&"x".repeat(65)));
    }
}
