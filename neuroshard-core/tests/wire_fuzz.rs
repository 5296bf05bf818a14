//! Hostile input: 100,000 random and mutated frames decode to a frame or a typed error, never a
//! panic, and never allocate more than the frame limit (measured by a counting allocator).

use neuroshard_core::wire::{decode_frame, encode_slice, read_frame, Codec, FrameMeta};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
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
    let mutation = (
        0usize..frames.len(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        proptest::option::of(any::<prop::sample::Index>()),
    );
    TestRunner::new(config)
        .run(&mutation, |(which, edits, cut)| {
            let mut bytes = frames[which].clone();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            exercise(&bytes, &rt);
            prop_assert!(LARGEST.load(Ordering::Relaxed) <= 8 * MAX_FRAME);
            Ok(())
        })
        .expect("mutated frames");
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
