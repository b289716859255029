//! Throughput of PAN masking on 64 MiB inputs: JSON and text with sparse digits, rows dense
//! with digits, and `bytea` rows in PostgreSQL's hex output. Besides the digit scanner, the
//! hex pass that PostgreSQL's handler runs first is timed on each. Run with
//! `cargo bench -p gateway-user --bench mask`.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use gateway_user::mask::{
    MaskPolicy, StreamMasker, mask_base64_strings, mask_in_place, mask_in_place_with_hex,
};
use std::hint::black_box;
use std::time::Duration;

/// Input size per benchmark: large enough that caches do not hold it, as on a busy proxy.
const INPUT_BYTES: usize = 64 << 20;

/// Piece size for the streaming benchmark, a typical socket read.
const STREAM_PIECE_BYTES: usize = 64 << 10;

/// Deterministic generator (xorshift64*) so that every run measures the same bytes.
struct Generator(u64);

impl Generator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
        choices[self.below(choices.len() as u64) as usize]
    }
}

const WORDS: &[&str] = &[
    "alice", "bob", "payment", "status", "approved", "declined", "merchant", "lorem", "ipsum",
    "dolor", "amet", "gateway", "session", "request", "response", "customer", "address",
];

const CARDS: &[&str] = &[
    "4111 1111 1111 1111",
    "5555-5555-5555-4444",
    "4111111111111111",
    "2221000000000009",
];

/// JSON records and log lines: mostly words, with an id, an amount and now and then a card.
fn sparse_input() -> Vec<u8> {
    let mut generator = Generator(0x9e37_79b9_7f4a_7c15);
    let mut text = String::with_capacity(INPUT_BYTES + 512);
    while text.len() < INPUT_BYTES {
        if generator.below(2) == 0 {
            text.push_str("{\"user\":\"");
            text.push_str(generator.pick(WORDS));
            text.push_str("\",\"note\":\"");
            for _ in 0..20 + generator.below(20) {
                text.push_str(generator.pick(WORDS));
                text.push(' ');
            }
            text.push_str("\",\"id\":");
            text.push_str(&generator.below(1_000_000).to_string());
            text.push_str(",\"amount\":");
            text.push_str(&format!(
                "{}.{:02}",
                generator.below(10_000),
                generator.below(100)
            ));
            if generator.below(10) == 0 {
                text.push_str(",\"card\":\"");
                text.push_str(generator.pick(CARDS));
                text.push('"');
            }
            text.push_str("}\n");
        } else {
            text.push_str("level=info msg=\"");
            for _ in 0..25 + generator.below(25) {
                text.push_str(generator.pick(WORDS));
                text.push(' ');
            }
            text.push_str("\"\n");
        }
    }
    text.truncate(INPUT_BYTES);
    text.into_bytes()
}

/// Result rows of numbers: cards, timestamps, decimals, long references and short counters.
fn dense_input() -> Vec<u8> {
    let mut generator = Generator(0x0123_4567_89ab_cdef);
    let mut text = String::with_capacity(INPUT_BYTES + 512);
    while text.len() < INPUT_BYTES {
        for column in 0..6 {
            if column > 0 {
                text.push(',');
            }
            match generator.below(5) {
                0 => text.push_str(generator.pick(CARDS)),
                1 => text.push_str(&(1_700_000_000_000 + generator.below(1 << 40)).to_string()),
                2 => text.push_str(&format!(
                    "{}.{:02}",
                    generator.below(100_000),
                    generator.below(100)
                )),
                3 => text.push_str(&format!("{:020}", generator.next())),
                _ => text.push_str(&generator.below(1000).to_string()),
            }
        }
        text.push('\n');
    }
    text.truncate(INPUT_BYTES);
    text.into_bytes()
}

/// `bytea` rows as psql prints them: an id and `\x` with the hex of 8 to 64 random bytes, or
/// of a card number in one row of ten.
fn hex_input() -> Vec<u8> {
    let mut generator = Generator(0x5851_f42d_4c95_7f2d);
    let mut text = String::with_capacity(INPUT_BYTES + 512);
    while text.len() < INPUT_BYTES {
        text.push_str(&generator.below(1_000_000).to_string());
        text.push_str("\t\\x");
        if generator.below(10) == 0 {
            for byte in generator.pick(CARDS).bytes() {
                text.push_str(&format!("{byte:02x}"));
            }
        } else {
            for _ in 0..8 + generator.below(57) {
                text.push_str(&format!("{:02x}", generator.below(256)));
            }
        }
        text.push('\n');
    }
    text.truncate(INPUT_BYTES);
    text.into_bytes()
}

/// A JSON list of Secrets as the Kubernetes API returns it: names, labels, and `data` values in
/// base64 of 16 to 256 random bytes, or of a card number in one value of ten.
fn base64_input() -> Vec<u8> {
    use base64::{Engine as _, engine::general_purpose::STANDARD};

    let mut generator = Generator(0x2545_f491_4f6c_dd1d);
    let mut text = String::with_capacity(INPUT_BYTES + 512);
    text.push_str("{\"kind\":\"SecretList\",\"items\":[");
    while text.len() < INPUT_BYTES {
        text.push_str("{\"metadata\":{\"name\":\"");
        text.push_str(generator.pick(WORDS));
        text.push_str("-credentials\",\"namespace\":\"payments\",\"resourceVersion\":\"");
        text.push_str(&generator.below(1_000_000).to_string());
        text.push_str("\"},\"type\":\"Opaque\",\"data\":{");
        for key in 0..1 + generator.below(4) {
            let value: Vec<u8> = if generator.below(10) == 0 {
                generator.pick(CARDS).as_bytes().to_vec()
            } else {
                (0..16 + generator.below(241))
                    .map(|_| generator.below(256) as u8)
                    .collect()
            };
            if key > 0 {
                text.push(',');
            }
            text.push_str(&format!("\"key{key}\":\"{}\"", STANDARD.encode(value)));
        }
        text.push_str("}},");
    }
    text.truncate(INPUT_BYTES);
    text.into_bytes()
}

fn bench_masking(criterion: &mut Criterion) {
    let policy = MaskPolicy::default();
    for (name, input) in [
        ("sparse", sparse_input()),
        ("dense", dense_input()),
        ("hex", hex_input()),
        ("base64", base64_input()),
    ] {
        let digits = input.iter().filter(|byte| byte.is_ascii_digit()).count();
        let pans = mask_in_place(&mut input.clone(), &policy);
        let with_hex = mask_in_place_with_hex(&mut input.clone(), &policy);
        let with_base64 = {
            let mut copy = input.clone();
            pans + mask_base64_strings(&mut copy, &policy)
        };
        eprintln!(
            "{name}: {} bytes, {:.1}% digits, {pans} PANs, {with_hex} with hex runs decoded, {with_base64} with base64 strings decoded",
            input.len(),
            100.0 * digits as f64 / input.len() as f64
        );

        let mut group = criterion.benchmark_group(format!("mask_{name}"));
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(2));
        group.measurement_time(Duration::from_secs(10));

        // Each sample masks a fresh copy; criterion leaves the copying out of the time.
        group.bench_function("in_place", |bencher| {
            bencher.iter_batched_ref(
                || input.clone(),
                |buf| black_box(mask_in_place(buf, &policy)),
                BatchSize::PerIteration,
            );
        });

        group.bench_function("in_place_with_hex", |bencher| {
            bencher.iter_batched_ref(
                || input.clone(),
                |buf| black_box(mask_in_place_with_hex(buf, &policy)),
                BatchSize::PerIteration,
            );
        });

        let mut out = Vec::with_capacity(input.len());
        group.bench_function("stream_64k", |bencher| {
            bencher.iter(|| {
                out.clear();
                let mut masker = StreamMasker::new(policy.clone());
                let mut masked = 0;
                for piece in input.chunks(STREAM_PIECE_BYTES) {
                    masked += masker.feed(piece, &mut out);
                }
                masked += masker.finish(&mut out);
                black_box(masked)
            });
        });
        // The Kubernetes handler's masker for JSON bodies.
        group.bench_function("stream_64k_with_base64", |bencher| {
            bencher.iter(|| {
                out.clear();
                let mut masker = StreamMasker::new(policy.clone()).with_base64();
                let mut masked = 0;
                for piece in input.chunks(STREAM_PIECE_BYTES) {
                    masked += masker.feed(piece, &mut out);
                }
                masked += masker.finish(&mut out);
                black_box(masked)
            });
        });
        group.finish();
    }
}

criterion_group!(benches, bench_masking);
criterion_main!(benches);
