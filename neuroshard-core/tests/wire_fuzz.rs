//! Hostile input: 100,000 random and mutated frames decode to a frame or a typed error, never a
//! panic, and never allocate more than the frame limit (measured by a counting allocator).

use neuroshard_core::wire::{decode_frame, encode_slice, read_frame, Codec, FrameMeta};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Tracks the largest single allocation while `ARMED` is set.
struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) != 0 {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MAX_FRAME: usize = 4096;

/// The allocation counter is process-wide: tests in this file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// Inputs exercised, to prove the configured case count really ran.
static CASES: AtomicUsize = AtomicUsize::new(0);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `check` on `config.cases` copies of `seeds`, each with a few bytes overwritten and
/// maybe cut short; a failing case panics, named by `what`.
fn run_mutations(
    seeds: &[Vec<u8>],
    config: ProptestConfig,
    what: &str,
    check: impl Fn(&[u8]) -> Result<(), TestCaseError>,
) {
    let mutation = (
        0usize..seeds.len(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        proptest::option::of(any::<prop::sample::Index>()),
    );
    TestRunner::new(config)
        .run(&mutation, |(which, edits, cut)| {
            let mut bytes = seeds[which].clone();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            check(&bytes)
        })
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

fn valid_frames() -> Vec<Vec<u8>> {
    let v: Vec<f32> = (0..96).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut out = Vec::new();
    for codec in Codec::ALL {
        for checksum in [false, true] {
            for dims in [&[96][..], &[3, 32], &[1, 2, 48], &[2, 2, 3, 8]] {
                out.push(
                    encode_slice(
                        &v,
                        dims,
                        codec,
                        FrameMeta {
                            session: 1,
                            position: 2,
                        },
                        checksum,
                    )
                    .expect("enc"),
                );
            }
        }
    }
    out
}

/// Decodes through both the buffer and the async stream path; both must return, not panic.
fn exercise(bytes: &[u8], rt: &tokio::runtime::Runtime) {
    CASES.fetch_add(1, Ordering::Relaxed);
    ARMED.store(1, Ordering::Relaxed);
    if let Ok((frame, _)) = decode_frame(bytes, MAX_FRAME) {
        let _ = frame.to_f32();
    }
    let mut reader = bytes;
    if let Ok(frame) = rt.block_on(read_frame(&mut reader, MAX_FRAME)) {
        let _ = frame.as_frame().to_f32();
    }
    ARMED.store(0, Ordering::Relaxed);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt")
}

/// Both properties in one test so the case count can be asserted after they ran.
#[test]
fn hostile_frames_never_panic_or_overallocate() {
    let _turn = serial();
    let rt = runtime();
    let frames = valid_frames();
    let config = ProptestConfig {
        cases: 50_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let before = CASES.load(Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
    // Random bytes.
    TestRunner::new(config.clone())
        .run(&proptest::collection::vec(any::<u8>(), 0..200), |bytes| {
            exercise(&bytes, &rt);
            // The 8x margin covers a decoded f32 copy of a quantised payload (at most
            // 32/18 * 4 bytes per payload byte) and small bookkeeping.
            prop_assert!(LARGEST.load(Ordering::Relaxed) <= 8 * MAX_FRAME);
            Ok(())
        })
        .expect("random frames");
    // Valid frames with a few bytes overwritten and maybe cut short.
    run_mutations(&frames, config, "mutated frames", |bytes| {
        exercise(bytes, &rt);
        prop_assert!(LARGEST.load(Ordering::Relaxed) <= 8 * MAX_FRAME);
        Ok(())
    });
    let ran = CASES.load(Ordering::Relaxed) - before;
    assert!(ran >= 100_000, "only {ran} inputs exercised");
}

#[test]
fn huge_declared_lengths_allocate_nothing_large() {
    // A header claiming a 2^40-byte payload (consistent with its dims) is refused up front.
    let _turn = serial();
    let mut b =
        encode_slice(&[0.0; 4], &[4], Codec::F32, FrameMeta::default(), false).expect("enc");
    b[32..36].copy_from_slice(&(1u32 << 30).to_le_bytes());
    b[24..32].copy_from_slice(&(4u64 << 30).to_le_bytes());
    LARGEST.store(0, Ordering::Relaxed);
    exercise(&b, &runtime());
    assert!(
        LARGEST.load(Ordering::Relaxed) < MAX_FRAME,
        "allocated {}",
        LARGEST.load(Ordering::Relaxed)
    );
}

/// Control messages (postcard behind a length prefix) from hostile peers: every decoder a
/// node or client runs on them, on random and mutated messages.
#[cfg(feature = "internals")]
mod control {
    use super::*;
    use neuroshard_core::internals::{read_message, Message, SessionOpen, SignedOpen};
    use neuroshard_core::net::{Announcement, ModelInfo, Reason, RouteHop, SignedAnnouncement};
    use neuroshard_core::{
        ModelCommitment, ModelManifest, SamplingParams, TensorDigest, TokenizerInfo,
    };

    /// Serde preallocates at most 1 MiB for a sequence whatever length it claims; beyond
    /// that, memory follows the bytes that really arrived.
    const MAX_ALLOC: usize = 1 << 20;

    fn framed(msg: &Message) -> Vec<u8> {
        let body = postcard::to_allocvec(msg).expect("encode");
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend(body);
        out
    }

    fn valid_messages() -> Vec<Vec<u8>> {
        let key = iroh::SecretKey::from_bytes(&[7; 32]);
        let hop = RouteHop {
            node: key.public(),
            layers: 0..30,
            addrs: vec!["127.0.0.1:4000".parse().expect("addr")],
        };
        let open = SessionOpen {
            session: 9,
            client: key.public(),
            model_id: "ab".repeat(32),
            route: vec![hop.clone()],
            codec: 1,
            sampling: SamplingParams::greedy(),
            prompt: vec![1, 2, 3],
            timestamp_ms: 1_700_000_000_000,
            nonce: 5,
            handover: None,
            return_logits: false,
            adapter: None,
            replicas: Vec::new(),
            referees: Vec::new(),
        };
        let announcement = Announcement {
            protocol_version: neuroshard_core::net::PROTOCOL_VERSION,
            node: key.public(),
            model_id: "ab".repeat(32),
            versions: Vec::new(),
            layers: 0..30,
            capacity: 64,
            load: 1,
            addrs: vec!["127.0.0.1:4000".parse().expect("addr")],
            entry: true,
            timestamp_ms: 1_700_000_000_000,
            expires_ms: 1_700_000_060_000,
        };
        let info = ModelInfo {
            model_id: "ab".repeat(32),
            layers: 30,
            context_len: 8192,
            tokenizer: TokenizerInfo {
                json: "{\"model\":{}}".into(),
                chat_template: Some("{{ messages }}".into()),
                eos_ids: vec![2],
                bos: Some((1, "<s>".into())),
                add_bos: true,
            },
            commitment: ModelCommitment {
                header: [3; 32],
                tensors: [4; 32],
            },
        };
        [
            Message::Open(SignedOpen::sign(&open, &key).expect("sign")),
            Message::Ping,
            Message::GetPeers { from: 3 },
            Message::Peers(vec![
                SignedAnnouncement::sign(&announcement, &key)
                    .expect("sign");
                3
            ]),
            Message::GetModelInfo,
            Message::ModelInfo(info),
            Message::Close { session: 9 },
            Message::Error {
                session: 9,
                hop: key.public(),
                reason: Reason::OverLimit,
                message: "too much".into(),
            },
            Message::Step {
                session: 9,
                attempt: 3,
                start_pos: 4,
                tokens: vec![5, 6, 7],
            },
            Message::Fill {
                session: 9,
                start_pos: 0,
                through: 3,
                tokens: vec![1, 2],
            },
            Message::Leaving {
                session: 9,
                node: key.public(),
                replacement: Some(hop.clone()),
            },
            Message::Handover {
                session: 9,
                to: hop,
            },
            Message::Token {
                session: 9,
                position: 3,
                token: 8,
            },
            Message::GetManifest,
            Message::Manifest(ModelManifest {
                version: neuroshard_core::MODEL_ID_VERSION,
                header: "cd".repeat(32),
                tensors: vec![
                    TensorDigest::of("blk.0.attn_k.weight", &[4, 5]),
                    TensorDigest::of("blk.0.attn_q.weight", &[1, 2, 3]),
                ],
            }),
        ]
        .iter()
        .map(framed)
        .collect()
    }

    /// Reads one message and runs every check a receiver runs on what it decoded.
    fn exercise_message(bytes: &[u8], rt: &tokio::runtime::Runtime) {
        CASES.fetch_add(1, Ordering::Relaxed);
        ARMED.store(1, Ordering::Relaxed);
        let mut reader = bytes;
        match rt.block_on(read_message(&mut reader)) {
            Ok(Message::Open(signed)) => {
                let _ = signed.verify();
            }
            Ok(Message::ModelInfo(info)) => {
                let _ = info.check();
            }
            Ok(Message::Manifest(manifest)) => {
                let _ = manifest.check();
            }
            Ok(Message::Peers(page)) => {
                for signed in &page {
                    let _ = signed.verify();
                }
            }
            _ => {}
        }
        ARMED.store(0, Ordering::Relaxed);
    }

    #[test]
    fn hostile_control_messages_never_panic_or_overallocate() {
        let _turn = serial();
        let rt = runtime();
        let messages = valid_messages();
        let config = ProptestConfig {
            cases: 50_000,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        let before = CASES.load(Ordering::Relaxed);
        LARGEST.store(0, Ordering::Relaxed);
        // Random bytes behind a length prefix that mostly matches them.
        let random = (
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::option::of(any::<u32>()),
        );
        TestRunner::new(config.clone())
            .run(&random, |(body, claimed)| {
                let len = claimed.unwrap_or(body.len() as u32);
                let mut bytes = len.to_le_bytes().to_vec();
                bytes.extend(body);
                exercise_message(&bytes, &rt);
                prop_assert!(LARGEST.load(Ordering::Relaxed) <= MAX_ALLOC);
                Ok(())
            })
            .expect("random messages");
        // Valid messages with a few bytes overwritten and maybe cut short.
        run_mutations(&messages, config, "mutated messages", |bytes| {
            exercise_message(bytes, &rt);
            prop_assert!(LARGEST.load(Ordering::Relaxed) <= MAX_ALLOC);
            Ok(())
        });
        let ran = CASES.load(Ordering::Relaxed) - before;
        assert!(ran >= 100_000, "only {ran} inputs exercised");
        // Unmodified, every seed decodes: the mutations start from real messages.
        for bytes in &messages {
            let mut reader = &bytes[..];
            rt.block_on(read_message(&mut reader))
                .expect("a valid seed");
        }
    }

    #[test]
    fn a_claimed_megabyte_allocates_only_what_arrives() {
        let _turn = serial();
        let mut bytes = ((1u32 << 20) - 1).to_le_bytes().to_vec();
        bytes.extend([0u8; 16]);
        LARGEST.store(0, Ordering::Relaxed);
        exercise_message(&bytes, &runtime());
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(largest <= 64 << 10, "allocated {largest}");
    }
}
