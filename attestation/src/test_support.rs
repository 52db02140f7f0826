//! Locating the recorded evidence shared by all tests.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `$CLOISTER_TESTDATA/<rel>`, else `<workspace>/../shared/testdata/<rel>`
/// (CI clones the repository with `shared/` beside it).
pub fn testdata(rel: &str) -> PathBuf {
    let base = std::env::var_os("CLOISTER_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata"));
    base.join(rel)
}

/// A fixed "now" inside every recorded certificate's validity (2026-01-01),
/// so tests do not start failing when a VCEK expires.
pub fn fixed_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_225_600)
}
