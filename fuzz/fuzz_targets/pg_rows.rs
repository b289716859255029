//! DataRow masking on arbitrary bytes: the whole-row and streamed paths must agree, and
//! masking never changes a row's length.
#![no_main]

use gateway_user::{
    mask::MaskPolicy,
    protocol::postgres::rows::{RowMasker, mask_data_row},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let policy = MaskPolicy::default();
    let mut whole = body.to_vec();
    let whole_ok = mask_data_row(&mut whole, &[], &policy).is_ok();
    assert_eq!(whole.len(), body.len());

    let split = usize::from(split).min(body.len());
    let mut masker = RowMasker::new(Vec::new(), policy);
    let mut streamed = Vec::new();
    let streamed_ok = masker.feed(&body[..split], &mut streamed).is_ok()
        && masker.feed(&body[split..], &mut streamed).is_ok()
        && masker.finish(&mut streamed).is_ok();
    // A row whose columns fill it exactly masks the same either way.
    if whole_ok && streamed_ok {
        assert_eq!(streamed, whole);
    }
});
