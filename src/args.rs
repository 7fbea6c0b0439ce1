//! Command-line values, checked where they are parsed: a size, a duration
//! or a name that makes no sense is a usage error saying why, never a
//! panic, an overflow or a word slipped onto the guest's kernel command
//! line.

use std::time::Duration;

/// The longest duration any option takes (a command's timeout, a boot
/// timeout): 30 days.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A guest memory size: `512M`, `1G`, `2GiB`, or a number of MiB; at
/// least 32 MiB and at most what this host has (and what the VMM gives).
pub fn parse_size_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "M"),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?} (try 512M or 2G)"))?;
    let per_unit = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "M" => 1,
        "G" => 1024,
        "T" => 1024 * 1024,
        _ => return Err(format!("unknown unit in {s:?} (use M or G)")),
    };
    let too_big = || {
        format!(
            "{s} is more memory than a guest can have ({} GiB at most)",
            vmm::layout::MAX_MEMORY_MIB >> 10
        )
    };
    let mib = n.checked_mul(per_unit).ok_or_else(too_big)?;
    if mib < 32 {
        return Err("memory must be at least 32M".into());
    }
    if mib > vmm::layout::MAX_MEMORY_MIB {
        return Err(too_big());
    }
    if let Some(host) = host_memory_mib() {
        if mib > host {
            return Err(format!(
                "{s} is more than this host's {} MiB of memory",
                host
            ));
        }
    }
    Ok(mib)
}

/// MemTotal from /proc/meminfo, in MiB.
fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// A duration in seconds (fractions allowed) or with units (`90s`, `30m`,
/// `1h30m`, `2d`): finite, above zero, at most [`MAX_DURATION`].
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = match s.trim().parse() {
        Ok(secs) => secs,
        Err(_) => humantime::parse_duration(s.trim())
            .map_err(|_| format!("not a time: {s:?} (seconds, or with a unit: 90s, 30m, 2h)"))?
            .as_secs_f64(),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!(
            "{s} is not a time: give a number of seconds above 0"
        ));
    }
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| {
            format!(
                "{s} seconds is longer than the {} days allowed",
                MAX_DURATION.as_secs() / 86400
            )
        })
}

/// A guest hostname: letters, digits, '-' and '.', at most 64.
pub fn parse_hostname(s: &str) -> Result<String, String> {
    if sandbox::valid_hostname(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid hostname {s:?}: use letters, digits, '-' and '.', at most 64"
        ))
    }
}

/// A vCPU count the VMM can give.
pub fn parse_cpus(s: &str) -> Result<u8, String> {
    let max = vmm::layout::MAX_VCPUS;
    match s.trim().parse::<u8>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("--cpus takes 1 to {max}, not {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert_eq!(parse_size_mib("300"), Ok(300));
        assert!(parse_size_mib("16M").is_err());
        assert!(parse_size_mib("lots").is_err());
        assert!(parse_size_mib("5X").is_err());
        // Overflow and absurd sizes are refused, not wrapped.
        let e = parse_size_mib("18014398509481983M").unwrap_err();
        assert!(e.contains("more"), "{e}");
        assert!(parse_size_mib("18446744073709551615G").is_err());
        assert!(parse_size_mib("99999999999999999999").is_err());
        assert!(parse_size_mib("2T").is_err() || host_memory_mib().unwrap_or(0) >= 2 << 20);
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_seconds("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_seconds("1h30m"), Ok(Duration::from_secs(5400)));
        for bad in [
            "NaN",
            "inf",
            "-1",
            "0",
            "",
            "1e300",
            "soon",
            "0s",
            "5 parsecs",
            "99999d",
        ] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostnames_and_cpus() {
        assert!(parse_hostname("fork-3.capsule").is_ok());
        for bad in [
            "",
            "a b",
            "a capsule.root=/dev/sda",
            "x\n",
            "-x",
            &"x".repeat(65),
        ] {
            assert!(parse_hostname(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_cpus("2"), Ok(2));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("65").is_err());
        assert!(parse_cpus("300").is_err());
    }
}

/// What a guest's disk flushes do (`--flush`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Flush {
    /// Sync the image file before the flush completes: what the guest was
    /// told is on disk survives a host crash (the default).
    #[default]
    Honour,
    /// Complete flushes at once and let the host's page cache write back:
    /// faster for sync-heavy work; a host crash or power loss can lose
    /// writes the guest believed durable (a guest crash loses nothing).
    Writeback,
}

impl Flush {
    pub fn policy(self) -> vmm::FlushPolicy {
        match self {
            Flush::Honour => vmm::FlushPolicy::Honour,
            Flush::Writeback => vmm::FlushPolicy::Writeback,
        }
    }
}
