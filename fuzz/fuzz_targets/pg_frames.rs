//! The PostgreSQL frame reader on arbitrary bytes: a startup packet, then tagged messages,
//! held or streamed by size. It must end with a value or an error, never a panic or an
//! allocation beyond the limits.
#![no_main]

use gateway_user::protocol::postgres::codec::{FrameReader, MAX_AUTH_MESSAGE_LEN, MAX_MESSAGE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut reader = FrameReader::new(data);
        if reader.read_startup().await.is_err() {
            return;
        }
        // The first byte picks the phase limit, as authentication and queries use different ones.
        let limit = if data.first().is_some_and(|b| b % 2 == 0) { MAX_AUTH_MESSAGE_LEN } else { MAX_MESSAGE_LEN };
        while let Ok(Some(header)) = reader.read_header(limit).await {
            if header.is_held() {
                if reader.read_body(header).await.is_err() {
                    return;
                }
            } else {
                let mut left = header.body_len;
                while left > 0 {
                    match reader.read_piece(left).await {
                        Ok(piece) => left -= piece.len(),
                        Err(_) => return,
                    }
                }
            }
        }
    });
});
