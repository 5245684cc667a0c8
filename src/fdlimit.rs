//! Raises the soft limit on open files to the hard limit at start, as Go programs do: the
//! soft default (often 1024) is what a burst of probe or scrape connections exhausts.

/// The soft and hard limit after raising, or the OS error.
pub fn raise_nofile() -> std::io::Result<(libc::rlim_t, libc::rlim_t)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit = raised;
        }
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// How many idle probe connections may be kept under a soft limit of `soft` open files:
/// half of it, so that the API server's connections, scrapes and probes in flight always
/// find a descriptor; a probe whose connection could not be kept pays a handshake, a probe
/// that finds no descriptor fails.
pub fn kept_connections(soft: libc::rlim_t) -> usize {
    usize::try_from(soft / 2).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn soft_limit_ends_at_the_hard_limit() {
        let (soft, hard) = super::raise_nofile().expect("rlimit calls succeed");
        assert_eq!(soft, hard);
    }
}
