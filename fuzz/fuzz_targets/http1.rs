//! `http1::exchange` reading any bytes a pod sends back. Beyond not panicking: an answer is
//! only read from bytes that start as HTTP/1.x, it is never an interim one, its body stays
//! within the bound, a reusable connection had nothing left over, and an error is short.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault_registrar::http1::{ExchangeError, exchange};

const MAX_BODY: usize = 1024;

fuzz_target!(|data: &[u8]| {
    // The pod's bytes to read, and the request written to nowhere.
    let mut pod = tokio::io::join(data, tokio::io::sink());
    let got = futures::executor::block_on(exchange(&mut pod, b"GET / HTTP/1.1\r\n\r\n", MAX_BODY));
    match got {
        Ok(answer) => {
            // Empty lines before an answer are skipped, as RFC 9112 allows.
            let start = data.iter().position(|b| !b"\r\n".contains(b)).unwrap_or(data.len());
            assert!(data[start..].starts_with(b"HTTP/1."), "an answer from {data:?}");
            assert!((200..=999).contains(&answer.status), "{}", answer.status);
            assert!(answer.body.len() <= MAX_BODY, "{} bytes", answer.body.len());
            if answer.reusable {
                // Everything was read: the body is the input's tail, or it was chunked.
                let tail = data.ends_with(&answer.body);
                let chunked = data.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked"));
                assert!(tail || chunked, "{answer:?} from {data:?}");
            }
        }
        Err(ExchangeError::Broken(text) | ExchangeError::Malformed(text)) => {
            assert!(text.len() <= 160, "{} bytes: {text}", text.len());
            assert!(!text.chars().any(char::is_control), "{text:?}");
        }
    }
});
