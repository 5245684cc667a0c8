//! `health::classify` on any status code and body. Beyond not panicking: only a coherent
//! answer is a role (active needs an initialised, unsealed, non-standby body and 200, or 472
//! from a DR secondary), a version is a valid label value, and an error quotes no more than a
//! short, printable excerpt.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_registrar::health::{Role, classify};

#[derive(serde::Deserialize, Debug)]
struct Flags {
    initialized: bool,
    sealed: bool,
    standby: bool,
    #[serde(default)]
    replication_dr_mode: Option<String>,
}

/// The codes Vault answers with, and a few it never does; the rest of the input is the body.
const CODES: [u16; 12] = [200, 429, 472, 473, 474, 501, 503, 530, 204, 302, 404, 500];

fuzz_target!(|data: &[u8]| {
    let Some((&code, body)) = data.split_first() else {
        return;
    };
    let status = CODES[code as usize % CODES.len()];
    match classify(status, body) {
        Ok(health) => {
            // Read again with only the flags: fields the operator ignores may be anything
            // JSON allows, even escapes serde_json's Value refuses.
            let flags: Flags = serde_json::from_slice(body).expect("a role from JSON flags");
            let expected = match health.role {
                // A DR secondary's leader answers 472, and only it.
                Role::Active if flags.replication_dr_mode.as_deref() == Some("secondary") => 472,
                Role::Active => 200,
                Role::Standby => {
                    assert!(matches!(status, 429 | 472 | 474));
                    status
                }
                Role::PerfStandby => 473,
                Role::Sealed => 503,
                Role::Uninitialized => 501,
                Role::Removed => 530,
            };
            assert_eq!(status, expected, "{health:?}");
            if health.role == Role::Active {
                assert!(flags.initialized && !flags.sealed && !flags.standby, "{flags:?}");
            }
            let v = &health.version;
            assert!(v.len() <= 63, "{v}");
            assert!(v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)), "{v}");
            assert!(v.is_empty() || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())), "{v}");
        }
        Err(error) => {
            let text = error.to_string();
            assert!(text.len() <= 160, "{} bytes: {text}", text.len());
            assert!(!text.chars().any(char::is_control), "{text:?}");
        }
    }
});
