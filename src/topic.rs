//! Topic names, topic filters and matching (MQTT 3.1.1 section 4.7).

use crate::codec::{MAX_STRING_LEN, utf8_string};

/// Why a topic name or filter is not allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopicError {
    /// Topics and filters are at least one character long.
    Empty,
    /// Longer than 65,535 bytes.
    TooLong,
    /// Not well-formed UTF-8, or contains U+0000.
    InvalidUtf8,
    /// A topic name (as published) contains `+` or `#`.
    WildcardInName,
    /// A filter uses `+` or `#` other than as a whole level (`#` last).
    MisplacedWildcard,
    /// A shared subscription (`$share/GROUP/FILTER`) without a group name,
    /// with a wildcard in it, or without a filter.
    InvalidShare,
}

/// What a shared subscription's filter starts with (MQTT 5, section
/// 4.8.2; mosquitto takes it from 3.1.1 clients too).
const SHARE_PREFIX: &[u8] = b"$share/";

/// The filter a shared subscription (`$share/GROUP/FILTER`) matches
/// topics with, and its group name; `None` for another filter.
fn shared(filter: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = filter.strip_prefix(SHARE_PREFIX)?;
    let slash = rest.iter().position(|&byte| byte == b'/')?;
    let (group, filter) = rest.split_at(slash);
    Some((filter.get(1..).unwrap_or(&[]), group))
}

fn check_text(bytes: &[u8]) -> Result<(), TopicError> {
    if bytes.is_empty() {
        return Err(TopicError::Empty);
    }
    if bytes.len() > MAX_STRING_LEN {
        return Err(TopicError::TooLong);
    }
    utf8_string(bytes).map_err(|_| TopicError::InvalidUtf8)?;
    Ok(())
}

/// Checks a topic name: what a PUBLISH carries.
pub fn check_name(bytes: &[u8]) -> Result<(), TopicError> {
    check_text(bytes)?;
    if bytes.iter().any(|&byte| byte == b'+' || byte == b'#') {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter: what SUBSCRIBE and UNSUBSCRIBE carry.
pub fn check_filter(bytes: &[u8]) -> Result<(), TopicError> {
    check_text(bytes)?;
    if bytes.starts_with(SHARE_PREFIX) {
        let (filter, group) = shared(bytes).ok_or(TopicError::InvalidShare)?;
        let wildcard = group.iter().any(|&byte| byte == b'+' || byte == b'#');
        if group.is_empty() || wildcard || filter.is_empty() {
            return Err(TopicError::InvalidShare);
        }
    }
    let mut levels = bytes.split(|&byte| byte == b'/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        let has_wildcard = level.iter().any(|&byte| byte == b'+' || byte == b'#');
        let allowed = match level {
            b"+" => true,
            b"#" => is_last,
            _ => !has_wildcard,
        };
        if !allowed {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Whether a topic name matches a topic filter.
///
/// Both are taken as given (call [`check_filter`] and [`check_name`]
/// first for a meaningful answer); no input makes this panic. A topic
/// starting with `$` is not matched by a filter starting with a wildcard.
/// A shared subscription's filter matches as the filter after its group.
pub fn matches(filter: &[u8], topic: &[u8]) -> bool {
    let filter = shared(filter).map_or(filter, |(filter, _)| filter);
    if topic.first() == Some(&b'$') && matches!(filter.first(), Some(b'+') | Some(b'#')) {
        return false;
    }
    let mut filter_levels = filter.split(|&byte| byte == b'/');
    let mut topic_levels = topic.split(|&byte| byte == b'/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            // "a/#" also matches "a": the parent level itself.
            (Some(b"#"), _) => return true,
            (Some(b"+"), Some(_)) => {}
            (Some(wanted), Some(level)) if wanted == level => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_subscriptions() {
        assert_eq!(check_filter(b"$share/group/a/+"), Ok(()));
        assert_eq!(check_filter(b"$share/g/#"), Ok(()));
        for bad in [
            "$share/",
            "$share/group",
            "$share//a",
            "$share/g+/a",
            "$share/#/a",
            "$share/+/a",
            "$share/g/",
        ] {
            assert_eq!(check_filter(bad.as_bytes()), Err(TopicError::InvalidShare), "{bad}");
        }
        assert!(matches(b"$share/group/a/+", b"a/b"));
        assert!(matches(b"$share/g/#", b"x/y"));
        assert!(!matches(b"$share/g/a/+", b"b/c"));
        assert!(!matches(b"$share/g/a", b"$share/g/a"));
        // Not a share: "$shared" is a filter of its own.
        assert!(matches(b"$shared/a", b"$shared/a"));
    }

    #[test]
    fn names() {
        assert_eq!(check_name(b"a/b"), Ok(()));
        assert_eq!(check_name(b"/"), Ok(()));
        assert_eq!(check_name(b"$SYS/x"), Ok(()));
        assert_eq!(check_name(b""), Err(TopicError::Empty));
        assert_eq!(check_name(b"a/+"), Err(TopicError::WildcardInName));
        assert_eq!(check_name(b"a#"), Err(TopicError::WildcardInName));
        assert_eq!(check_name(b"a\0b"), Err(TopicError::InvalidUtf8));
        assert_eq!(check_name(&[0xc3]), Err(TopicError::InvalidUtf8));
        assert_eq!(check_name(&[b'x'; 65_536]), Err(TopicError::TooLong));
        assert_eq!(check_name(&[b'x'; 65_535]), Ok(()));
    }

    #[test]
    fn filters_from_the_specification() {
        // Section 4.7.1.2 and 4.7.1.3.
        for good in [
            "sport/tennis/player1/#",
            "sport/#",
            "#",
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "/+",
            "+/+",
            "a//b",
        ] {
            assert_eq!(check_filter(good.as_bytes()), Ok(()), "{good}");
        }
        for bad in [
            "sport/tennis#",
            "sport/tennis/#/ranking",
            "sport+",
            "a/b+/c",
            "##",
            "#/",
        ] {
            assert_eq!(
                check_filter(bad.as_bytes()),
                Err(TopicError::MisplacedWildcard),
                "{bad}"
            );
        }
        assert_eq!(check_filter(b""), Err(TopicError::Empty));
    }

    #[test]
    fn matching_from_the_specification() {
        let cases = [
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            ("sport/tennis/player1/#", "sport/tennis/player1/ranking", true),
            ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", true),
            ("sport/#", "sport", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player1/tournament", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("#", "$SYS/x", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/monitor/Clients", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("A/b", "a/b", false),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(
                matches(filter.as_bytes(), topic.as_bytes()),
                expected,
                "{filter} vs {topic}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn matching_never_panics(filter: Vec<u8>, topic: Vec<u8>) {
            let _ = matches(&filter, &topic);
        }

        #[test]
        fn a_topic_matches_itself_and_hash(topic in "[a-z]{1,5}(/[a-z]{0,5}){0,4}") {
            proptest::prop_assert!(matches(topic.as_bytes(), topic.as_bytes()));
            proptest::prop_assert!(matches(b"#", topic.as_bytes()));
        }
    }
}
