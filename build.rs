//! Records when the binary was built (`FIELDBRIDGE_BUILD_UNIX`, seconds since the epoch): a
//! wall clock earlier than that is certainly wrong (a Pi without a real-time clock that booted
//! at 1970 or at an old saved time), so commands that depend on time are refused until it is
//! set. Reproducible builds set `SOURCE_DATE_EPOCH`, which is taken instead of the time now.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let now = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    println!("cargo:rustc-env=FIELDBRIDGE_BUILD_UNIX={now}");
}
