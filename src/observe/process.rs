//! The process's own figures, from `/proc/self` (Linux): resident memory, CPU time, open file
//! descriptors. Zero where `/proc` cannot be read.

use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Process {
    pub resident_bytes: u64,
    pub peak_resident_bytes: u64,
    pub virtual_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub threads: u64,
}

/// Reads the figures now (a few small reads of `/proc/self`).
pub fn read() -> Process {
    let mut p = Process::default();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            let kib = |rest: &str| {
                rest.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1024
            };
            if let Some(rest) = line.strip_prefix("VmRSS:") {
                p.resident_bytes = kib(rest);
            } else if let Some(rest) = line.strip_prefix("VmHWM:") {
                p.peak_resident_bytes = kib(rest);
            } else if let Some(rest) = line.strip_prefix("VmSize:") {
                p.virtual_bytes = kib(rest);
            } else if let Some(rest) = line.strip_prefix("Threads:") {
                p.threads = rest.trim().parse().unwrap_or(0);
            }
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        p.cpu_seconds = cpu_seconds(&stat, clock_ticks());
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // Less the descriptor of the directory being read.
        p.open_fds = (dir.count() as u64).saturating_sub(1);
    }
    // SAFETY: getrlimit writes the struct it is given; no other effect.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        p.max_fds = limit.rlim_cur;
    }
    p
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system setting.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User plus system time from a `/proc/PID/stat` line (fields 14 and 15, counted after the
/// command name, which is in parentheses and may contain spaces).
fn cpu_seconds(stat: &str, ticks: f64) -> f64 {
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    // After ")": field 3 (state) is the first; utime is field 14, stime 15.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (get(11) + get(12)) as f64 / ticks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_a_command_name_with_spaces() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 123 0 0";
        assert!((cpu_seconds(stat, 100.0) - 3.0).abs() < 1e-9);
        assert_eq!(cpu_seconds("garbage", 100.0), 0.0);
    }

    #[test]
    fn the_running_process_has_memory_and_descriptors() {
        let p = read();
        assert!(p.resident_bytes > 0);
        assert!(p.peak_resident_bytes >= p.resident_bytes);
        assert!(p.open_fds >= 3, "{}", p.open_fds);
        assert!(p.max_fds >= p.open_fds);
    }
}
