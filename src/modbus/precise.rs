//! A sleep with microsecond precision for the RTU silent interval.
//!
//! tokio's timer wheel has millisecond slots and rounds a deadline up to the next one, so a
//! 1.75 ms frame gap becomes 2-3 ms (measured at the device with tests/common/wire.rs: the
//! median silence at 115200 baud was 3.35 ms). On an RS-485 line that is bus time lost on every
//! frame. A `timerfd` (CLOCK_MONOTONIC, the clock of `std::time::Instant` on Linux) fires at
//! the given nanosecond plus the kernel's timer slack (50 µs by default), and tokio's reactor
//! wakes on it like on any other fd. Never early: the kernel does not expire a timer before
//! its time. If the timerfd cannot be made, tokio's sleep is used.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Sleeps for `d`, precise to tens of microseconds.
pub async fn sleep(d: Duration) {
    if d.is_zero() {
        return;
    }
    let Ok(fd) = arm(d) else {
        return tokio::time::sleep(d).await;
    };
    // SAFETY: an OwnedFd stays open, and returns the same fd, until the AsyncFd drops it.
    match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
        Ok(fd) => wait(&fd, d).await,
        Err(_) => tokio::time::sleep(d).await,
    }
}

async fn wait(fd: &AsyncFd<OwnedFd>, d: Duration) {
    // Bounded: a timer that never became readable (it cannot) would cost at most its own time
    // plus a millisecond, as tokio's sleep.
    let bound = tokio::time::sleep(d + Duration::from_millis(2));
    tokio::pin!(bound);
    loop {
        tokio::select! {
            ready = fd.readable() => {
                let Ok(mut guard) = ready else { return };
                let mut expirations = [0u8; 8];
                // SAFETY: reading 8 bytes into an 8-byte buffer from a valid timerfd.
                let n = unsafe {
                    libc::read(fd.get_ref().as_raw_fd(), expirations.as_mut_ptr().cast(), 8)
                };
                if n == 8 {
                    return;
                }
                guard.clear_ready();
            }
            () = &mut bound => return,
        }
    }
}

fn arm(d: Duration) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls; the fd is owned by the returned OwnedFd.
    unsafe {
        let raw = libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        );
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
            },
        };
        if libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn a_precise_sleep_is_never_short() {
        for micros in [1, 300, 1750, 4011] {
            let d = Duration::from_micros(micros);
            let t0 = Instant::now();
            sleep(d).await;
            assert!(t0.elapsed() >= d, "{micros} us slept {:?}", t0.elapsed());
        }
    }
}
