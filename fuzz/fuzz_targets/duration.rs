//! `crd::parse_duration` against a reference reading of the schema's own syntax
//! (`([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+`): what the schema accepts, the operator reads
//! to the same value; nothing panics and nothing parses negative.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_registrar::crd::parse_duration;

/// The schema's syntax read by hand: nanoseconds and the number of pieces; None if the
/// schema refuses the text.
fn reference(text: &str) -> Option<(f64, usize)> {
    const UNITS: [(&str, f64); 7] = [
        ("ns", 1.0),
        ("us", 1e3),
        ("µs", 1e3),
        ("ms", 1e6),
        ("s", 1e9),
        ("m", 60e9),
        ("h", 3600e9),
    ];
    let mut rest = text;
    let mut total = 0.0;
    let mut pieces = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let whole = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if whole == 0 {
            return None;
        }
        let mut end = whole;
        if rest[end..].starts_with('.') {
            let frac = rest[end + 1..]
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len() - end - 1);
            if frac == 0 {
                return None;
            }
            end += 1 + frac;
        }
        let number: f64 = rest[..end].parse().ok()?;
        rest = &rest[end..];
        // Longest unit first: "ms" before "m", "ns" before nothing else.
        let (unit, scale) = UNITS
            .iter()
            .filter(|(u, _)| rest.starts_with(u))
            .max_by_key(|(u, _)| u.len())?;
        total += number * scale;
        pieces += 1;
        rest = &rest[unit.len()..];
    }
    Some((total, pieces))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_duration(text);
    match (reference(text), &parsed) {
        // Within what the API server lets through (at most 5m is checked there; well below
        // i64 nanoseconds here), the schema's syntax always reads, to the same value. Each
        // piece is rounded to whole nanoseconds on its own, so the pieces' errors add up
        // ("0.5µs0.5µs…": up to 1 ns each; found by fuzzing, regressions/duration).
        (Some((ns, pieces)), _) if ns < 1e15 => {
            let got = parsed.unwrap_or_else(|e| panic!("{text:?} fits the schema: {e}"));
            let got = got.as_nanos() as f64;
            let tolerance = pieces as f64 + ns * 1e-9;
            assert!((got - ns).abs() <= tolerance, "{text:?}: {got} ns, expected {ns}");
        }
        _ => {
            if let Err(e) = &parsed {
                assert!(!e.is_empty());
            }
        }
    }
});
