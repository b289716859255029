//! The StartupMessage parameter parser on arbitrary bytes.
#![no_main]

use gateway_user::protocol::postgres::parse_startup;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = parse_startup(data) {
        // A parsed user or database must come from the input: invalid UTF-8 becomes one
        // replacement character per byte at most, so counting characters bounds them.
        assert!(info.user.chars().count() <= data.len());
        assert!(info.database.chars().count() <= data.len());
    }
});
