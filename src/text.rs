//! Bounds on text that pods choose. A probed pod controls its answer, and so the version
//! and the parser's error text; whatever it sends, what reaches a label, the status or an
//! event is short, printable and escaped, so no answer can grow the VaultCluster toward
//! etcd's object limit or smuggle control characters into `kubectl` output.

/// Longest probe error kept for a pod (in `members[].lastProbeError`).
pub const PROBE_ERROR: usize = 256;
/// Longest quote of an answer inside an error.
pub const EXCERPT: usize = 64;
/// Longest condition message (the API server's own limit is 32 KiB).
pub const CONDITION: usize = 1024;
/// Longest event note: events.k8s.io refuses notes over 1 kB.
pub const EVENT_NOTE: usize = 1000;
/// Longest label value.
pub const LABEL_VALUE: usize = 63;

const ELLIPSIS: char = '…';

/// At most `max` bytes of `text`, with control and non-ASCII characters escaped, ending in
/// an ellipsis when something was cut.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(max.min(text.len()));
    for c in text.chars() {
        // The ellipsis stays as it is: the text may hold an excerpt made before.
        let piece: String = if c.is_ascii_graphic() || c == ' ' || c == ELLIPSIS {
            c.to_string()
        } else {
            c.escape_default().collect()
        };
        if out.len() + piece.len() > max.saturating_sub(ELLIPSIS.len_utf8()) {
            out.push(ELLIPSIS);
            return shorten(out, max);
        }
        out.push_str(&piece);
    }
    out
}

/// `text` cut to at most `max` bytes on a character boundary, marked with an ellipsis.
/// For text built by us around pieces already escaped.
pub fn shorten(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(ELLIPSIS.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push(ELLIPSIS);
    text
}

/// A version as Vault puts it in its label: anything but letters, digits, '-', '_' and
/// '.' becomes '-'; then cut to a label value's 63 characters and trimmed to begin and end
/// with a letter or digit, as label values must.
pub fn label_version(version: &str) -> String {
    let sanitized: String = version
        .chars()
        .take(LABEL_VALUE)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    sanitized
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_short_and_escaped() {
        let cases: &[(&str, usize, &str)] = &[
            ("plain", 64, "plain"),
            ("line\nbreak\ttab", 64, "line\\nbreak\\ttab"),
            ("\u{1b}[31mred", 64, "\\u{1b}[31mred"),
            ("é", 64, "\\u{e9}"),
            ("abcdefghij", 8, "abcde…"),
            ("", 8, ""),
        ];
        for (text, max, want) in cases {
            assert_eq!(excerpt(text, *max), *want, "{text:?}");
        }
        let huge = "x".repeat(65536);
        assert!(excerpt(&huge, EXCERPT).len() <= EXCERPT);
        let wide = "\u{202e}".repeat(1000);
        let got = excerpt(&wide, EXCERPT);
        assert!(got.len() <= EXCERPT && got.ends_with(ELLIPSIS));
        assert!(!got.contains('\u{202e}'), "{got}");
    }

    #[test]
    fn shorten_cuts_on_a_character_boundary() {
        assert_eq!(shorten("short".into(), 10), "short");
        assert_eq!(shorten("ééééé".into(), 6), "é…");
        let long = "ab€".repeat(500);
        let got = shorten(long, CONDITION);
        assert!(got.len() <= CONDITION && got.ends_with(ELLIPSIS));
    }

    #[test]
    fn versions_become_label_values() {
        let cases: &[(&str, &str)] = &[
            ("1.21.4", "1.21.4"),
            ("1.15.2+ent", "1.15.2-ent"),
            ("1.15.2+ent.hsm", "1.15.2-ent.hsm"),
            ("", ""),
            ("-leading", "leading"),
            ("v1 (dev)", "v1--dev"),
            ("€1", "1"),
        ];
        for (raw, want) in cases {
            assert_eq!(label_version(raw), *want, "{raw:?}");
        }
        let long = "9".repeat(70_000);
        assert_eq!(label_version(&long).len(), LABEL_VALUE);
    }
}
