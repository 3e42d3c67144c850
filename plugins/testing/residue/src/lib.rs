//! Test plugin `residue`: looks in its own linear memory for what an earlier
//! job left there. It reads memory it never wrote on purpose, so the host's
//! isolation between jobs can be tested; never deploy it.
//!
//! - `mode=write`: fills `size_mb` MiB of its heap (then frees it) and 64 KiB
//!   of its stack with a word made from `seed`, and returns the image.
//! - `mode=scan`: grows its memory by as much as a `write` job did, then
//!   counts that word in every aligned place of its whole linear memory;
//!   fails with `found N` if it finds any, else returns the image.
//! - `mode=both`: a `write` then a `scan` in the same job, which must find
//!   the word: the test's proof that the scan can see it.
//!
//! The word itself is never kept in memory while scanning (only the word
//! plus one is), so the scan does not find its own needle.

wit_bindgen::generate!({ world: "filter", path: "../../../wit" });

#[allow(unused_imports)]
use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue};

struct Residue;

impl Guest for Residue {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "residue".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Test plugin: looks in its memory for what an earlier job left there."
                .into(),
            params: params(),
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let find = |name: &str| params.iter().find(|p| p.name == name).map(|p| &p.value);
        let mode = match find("mode") {
            Some(ParamValue::Text(t)) => t.clone(),
            _ => "scan".into(),
        };
        let seed = match find("seed") {
            Some(ParamValue::Integer(n)) => *n as u64,
            _ => 1,
        };
        let size_mb = match find("size_mb") {
            Some(ParamValue::Integer(n)) => (*n).clamp(1, 64) as usize,
            _ => 8,
        };
        // word + 1, so the word itself is not held anywhere by this job
        // (not even spilled to its stack).
        let word_plus_one = std::hint::black_box(marker(seed).wrapping_add(1));
        if mode == "write" || mode == "both" {
            write(word_plus_one, size_mb);
        }
        if mode == "scan" || mode == "both" {
            if mode == "scan" {
                grow(size_mb);
            }
            let found = scan(word_plus_one);
            if found > 0 {
                return Err(FilterError::Failed(format!(
                    "found {found} words of the pattern"
                )));
            }
        }
        Ok(image)
    }
}

/// The word for `seed`: distinct for each seed, never zero.
fn marker(seed: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    x | 1
}

#[inline(never)]
fn write(word_plus_one: u64, size_mb: usize) {
    let word = word_plus_one.wrapping_sub(1);
    let heap = vec![word; size_mb * (1 << 20) / 8];
    std::hint::black_box(&heap);
    drop(heap);
    let mut stack = [0u64; 8192];
    for w in stack.iter_mut() {
        *w = std::hint::black_box(word);
    }
    std::hint::black_box(&stack);
}

/// Grows the memory by what a `write` of `size_mb` MiB added.
fn grow(size_mb: usize) {
    let pages = size_mb * 16 + 16;
    core::arch::wasm32::memory_grow(0, pages);
}

/// Counts the aligned words of the whole linear memory that equal
/// `word_plus_one - 1`.
#[inline(never)]
fn scan(word_plus_one: u64) -> usize {
    let end = core::arch::wasm32::memory_size(0) * 65536;
    let mut found = 0;
    let mut at = 8;
    while at + 8 <= end {
        // SAFETY: every address below memory_size * 64 KiB is linear memory
        // (WebAssembly has no unmapped addresses below it); the value is
        // only compared.
        let word = unsafe { core::ptr::read_volatile(at as *const u64) };
        if word.wrapping_add(1) == word_plus_one {
            found += 1;
        }
        at += 8;
    }
    found
}

export!(Residue);

fn params() -> Vec<ParamSpec> {
    vec![
        ParamSpec {
            name: "mode".into(),
            kind: ParamKind::Text,
            default: ParamValue::Text("scan".into()),
            allowed: Constraint::OneOf(vec!["write".into(), "scan".into(), "both".into()]),
            description: "write the pattern, scan for it, or both in one job.".into(),
        },
        ParamSpec {
            name: "seed".into(),
            kind: ParamKind::Integer,
            default: ParamValue::Integer(1),
            allowed: Constraint::Any,
            description: "Makes the pattern's word.".into(),
        },
        ParamSpec {
            name: "size_mb".into(),
            kind: ParamKind::Integer,
            default: ParamValue::Integer(8),
            allowed: Constraint::Any,
            description: "MiB of heap the pattern fills (1 to 64).".into(),
        },
    ]
}
