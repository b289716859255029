//! The MySQL packet reader and row masker on arbitrary bytes. The reader must end with a
//! payload or an error, never a panic or an allocation beyond the phase limit. Each payload is
//! then masked as a text and as a binary row, whole and split in two, and masking must keep
//! its length and give the same bytes wherever the split falls.
#![no_main]

use gateway_user::{
    mask::MaskPolicy,
    protocol::mysql::{
        packet::{AUTH_LIMIT, COMMAND_LIMIT, PacketReader},
        rows::{Column, RowMasker, Wide},
    },
};
use libfuzzer_sys::fuzz_target;

fn mask(columns: &[Column], binary: bool, pieces: &[&[u8]]) -> Vec<u8> {
    let mut masker = RowMasker::new(columns.to_vec(), binary, MaskPolicy::default());
    let mut out = Vec::new();
    for piece in pieces {
        masker.feed(piece, &mut out);
    }
    masker.finish(&mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, wire)) = data.split_first() else {
        return;
    };
    // The selector picks the phase limit and the column types of the rows.
    let limit = if selector % 2 == 0 { AUTH_LIMIT } else { COMMAND_LIMIT };
    let types = [253, 8, 5, 3, 10, 1, 246, 252, 16, 4];
    let wide = [None, Some(Wide::Utf16Be), Some(Wide::Utf16Le), Some(Wide::Utf32Be)];
    let columns: Vec<Column> = (0..usize::from(selector % 7) + 1)
        .map(|index| Column {
            column_type: types[(usize::from(selector) + index) % types.len()],
            unsigned: selector & 0x80 != 0,
            whole: selector & 0x40 != 0 && index == 0,
            wide: wide[(usize::from(selector >> 4) + index) % wide.len()],
        })
        .collect();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut reader = PacketReader::new(wire);
        while let Ok(Some(payload)) = reader.read_payload(limit).await {
            assert!(payload.data.len() <= limit.max);
            for binary in [false, true] {
                let whole = mask(&columns, binary, &[&payload.data]);
                assert_eq!(whole.len(), payload.data.len());
                let split = usize::from(selector) % (payload.data.len() + 1);
                let (head, tail) = payload.data.split_at(split);
                assert_eq!(mask(&columns, binary, &[head, tail]), whole);
            }
        }
    });
});
