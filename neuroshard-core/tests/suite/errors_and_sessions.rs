//! Every way a caller can misuse the engine gets a typed error, and sessions behave as
//! documented: position-indexed overwrite, truncate, maximum length, close, idle expiry, limit.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use neuroshard_core::{EngineOptions, Error, ForwardRequest, ShardEngine, ShardInput};
use std::time::Duration;

fn tiny() -> std::path::PathBuf {
    fixtures().join("tiny-llama")
}

fn ids(v: &[u32]) -> ShardInput {
    ShardInput::Tokens(Tensor::from_slice(v, (1, v.len()), &Device::Cpu).expect("ids"))
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("neuroshard-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    dir
}

#[test]
fn missing_unknown_and_corrupt_files() {
    let err =
        ShardEngine::load("/nonexistent/model.gguf", 0..1, EngineOptions::default()).unwrap_err();
    assert!(matches!(err, Error::ModelFile { .. }), "{err}");

    let dir = tmpdir("unknown");
    let junk = dir.join("weights.bin");
    std::fs::write(&junk, b"not a model at all").expect("write");
    let err = ShardEngine::load(&junk, 0..1, EngineOptions::default()).unwrap_err();
    assert!(matches!(err, Error::UnknownFormat { .. }), "{err}");

    // A GGUF magic followed by garbage.
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00garbage").expect("write");
    let err = ShardEngine::load(&bad, 0..1, EngineOptions::default()).unwrap_err();
    assert!(matches!(err, Error::CorruptModel { .. }), "{err}");

    // A truncated copy of the real GGUF: the tensor table points past the end.
    let real = std::fs::read(smollm2()).expect("read gguf");
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &real[..real.len() / 2]).expect("write");
    let err = ShardEngine::load(&cut, 0..1, EngineOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::CorruptModel { ref reason, .. } if reason.contains("truncated")),
        "{err}"
    );

    // Safetensors without config.json.
    let no_cfg = tmpdir("nocfg");
    std::fs::copy(
        tiny().join("model.safetensors"),
        no_cfg.join("model.safetensors"),
    )
    .expect("copy");
    let err = ShardEngine::load(&no_cfg, 0..1, EngineOptions::default()).unwrap_err();
    assert!(matches!(err, Error::UnknownFormat { .. }), "{err}");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&no_cfg).ok();
}

#[test]
fn unsupported_architecture_and_dtype() {
    let dir = tmpdir("arch");
    std::fs::copy(
        tiny().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .expect("copy");
    let cfg = std::fs::read_to_string(tiny().join("config.json")).expect("cfg");
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"llama\"", "\"bert\""),
    )
    .expect("write");
    let err = ShardEngine::load(&dir, 0..1, EngineOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedArchitecture(ref a) if a == "bert"),
        "{err}"
    );

    // An integer weight tensor is not something the engine can dequantise.
    let mut tensors =
        candle_core::safetensors::load(tiny().join("model.safetensors"), &Device::Cpu)
            .expect("load");
    let w = tensors["model.layers.0.input_layernorm.weight"]
        .to_dtype(DType::U8)
        .expect("u8");
    tensors.insert("model.layers.0.input_layernorm.weight".into(), w);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).expect("save");
    std::fs::write(dir.join("config.json"), &cfg).expect("write");
    let err = ShardEngine::load(&dir, 0..1, EngineOptions::default()).unwrap_err();
    assert!(matches!(err, Error::UnsupportedDtype { .. }), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn slice_and_input_errors() {
    #[allow(clippy::reversed_empty_ranges)] // reversed on purpose: it must be rejected
    for bad in [0..0, 3..2, 2..5] {
        let err = ShardEngine::load(tiny(), bad.clone(), EngineOptions::default()).unwrap_err();
        assert!(
            matches!(err, Error::SliceOutOfRange { layers: 4, .. }),
            "{bad:?}: {err}"
        );
    }
    let second = ShardEngine::load(tiny(), 2..4, EngineOptions::default()).expect("load");
    let err = second
        .forward(ForwardRequest::new(ids(&[1, 2])))
        .unwrap_err();
    assert!(matches!(err, Error::BadInput(_)), "{err}");
    let wide = Tensor::zeros((1, 3, 65), DType::F32, &Device::Cpu).expect("t");
    let err = second
        .forward(ForwardRequest::new(ShardInput::Hidden(wide)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::HiddenSize {
                expected: 64,
                actual: 65
            }
        ),
        "{err}"
    );
    let half = Tensor::zeros((1, 3, 64), DType::F16, &Device::Cpu).expect("t");
    let err = second
        .forward(ForwardRequest::new(ShardInput::Hidden(half)))
        .unwrap_err();
    assert!(matches!(err, Error::HiddenDtype { .. }), "{err}");
    let flat = Tensor::zeros((3, 64), DType::F32, &Device::Cpu).expect("t");
    assert!(matches!(
        second.forward(ForwardRequest::new(ShardInput::Hidden(flat))),
        Err(Error::BadInput(_))
    ));
    let ok = Tensor::zeros((1, 3, 64), DType::F32, &Device::Cpu).expect("t");
    let err = second
        .forward(ForwardRequest::new(ShardInput::Hidden(ok)).layers(1..3))
        .unwrap_err();
    assert!(matches!(err, Error::SliceOutOfRange { .. }), "{err}");

    let first = ShardEngine::load(tiny(), 0..2, EngineOptions::default()).expect("load");
    let err = first
        .forward(ForwardRequest::new(ids(&[1, 999])))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TokenOutOfRange {
                id: 999,
                vocab: 256
            }
        ),
        "{err}"
    );
    let empty = ShardInput::Tokens(Tensor::zeros((1, 0), DType::U32, &Device::Cpu).expect("t"));
    assert!(matches!(
        first.forward(ForwardRequest::new(empty)),
        Err(Error::BadInput(_))
    ));
    let long: Vec<u32> = vec![1; 65];
    assert!(matches!(
        first.forward(ForwardRequest::new(ids(&long))),
        Err(Error::BadInput(_))
    ));
    // Nothing ran for the rejected requests.
    assert_eq!(
        first.stats().forward_calls + second.stats().forward_calls,
        0
    );
}

#[test]
fn sessions_overwrite_truncate_and_bound() {
    let options = EngineOptions {
        max_sessions: 2,
        max_session_len: Some(16),
        session_idle_timeout: Duration::from_secs(3600),
        ..EngineOptions::default()
    };
    let engine = ShardEngine::load(tiny(), 0..4, options).expect("load");
    let err = engine
        .forward(ForwardRequest::new(ids(&[1])).session(5, 0))
        .unwrap_err();
    assert!(matches!(err, Error::UnknownSession(5)), "{err}");
    engine.open_session(1).expect("open");
    assert!(matches!(
        engine.open_session(1),
        Err(Error::SessionExists(1))
    ));
    engine.open_session(2).expect("open");
    assert!(matches!(
        engine.open_session(3),
        Err(Error::SessionsFull { max: 2 })
    ));

    let last = |out: neuroshard_core::ShardOutput| -> Vec<f32> {
        let t = out.tensor();
        let seq = t.dim(1).expect("seq");
        t.narrow(1, seq - 1, 1)
            .expect("n")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v")
    };
    let prompt = [5u32, 6, 7, 8];
    let a = last(
        engine
            .forward(ForwardRequest::new(ids(&prompt)).session(1, 0))
            .expect("prefill"),
    );
    assert_eq!(engine.session_len(1).expect("len"), 4);
    // Writing position 3 again overwrites it: same result, no growth.
    let b = last(
        engine
            .forward(ForwardRequest::new(ids(&[8])).session(1, 3))
            .expect("retry"),
    );
    assert_eq!(engine.session_len(1).expect("len"), 4);
    let diff: f32 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-5, "retried step differs by {diff}");
    // A gap is refused.
    let err = engine
        .forward(ForwardRequest::new(ids(&[1])).session(1, 6))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::PositionGap {
                session: 1,
                start: 6,
                cached: 4
            }
        ),
        "{err}"
    );
    // Truncate, then continue differently from position 2.
    engine.truncate_session(1, 2).expect("truncate");
    assert_eq!(engine.session_len(1).expect("len"), 2);
    engine
        .forward(ForwardRequest::new(ids(&[9, 9])).session(1, 2))
        .expect("continue");
    // Maximum length.
    let err = engine
        .forward(ForwardRequest::new(ids(&[1; 13])).session(1, 4))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::SessionTooLong {
                session: 1,
                requested: 17,
                max: 16
            }
        ),
        "{err}"
    );
    assert!(engine.stats().kv_cache_bytes > 0);
    engine.close_session(1).expect("close");
    assert!(matches!(
        engine.close_session(1),
        Err(Error::UnknownSession(1))
    ));
    assert_eq!(engine.stats().sessions_open, 1);
}

#[test]
fn idle_sessions_expire() {
    let options = EngineOptions {
        max_sessions: 1,
        session_idle_timeout: Duration::ZERO,
        ..EngineOptions::default()
    };
    let engine = ShardEngine::load(tiny(), 0..4, options).expect("load");
    engine.open_session(1).expect("open");
    // With a zero timeout every session is idle: the full table makes room by expiring it.
    engine.open_session(2).expect("expired session 1 made room");
    assert!(matches!(
        engine.session_len(1),
        Err(Error::UnknownSession(1))
    ));
    assert_eq!(engine.expire_idle_sessions().expect("expire"), 1);
    assert_eq!(engine.stats().sessions_open, 0);
}

#[test]
fn training_errors() {
    let engine = ShardEngine::load(tiny(), 2..4, EngineOptions::default()).expect("load");
    let err = engine
        .backward(
            9,
            neuroshard_core::OutputGrad::Output(
                Tensor::zeros(1, DType::F32, &Device::Cpu).expect("t"),
            ),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Training(_)), "{err}");
    assert!(matches!(
        engine.step(&Default::default()),
        Err(Error::Training(_))
    ));
    let first = ShardEngine::load(tiny(), 0..2, EngineOptions::default()).expect("load");
    first.train_forward(1, ids(&[1, 2, 3])).expect("forward");
    let labels = Tensor::from_slice(&[1u32, 2, 3], (1, 3), &Device::Cpu).expect("t");
    let err = first
        .backward(1, neuroshard_core::OutputGrad::CausalLmLabels(labels))
        .unwrap_err();
    assert!(
        matches!(err, Error::Training(_)),
        "labels on a middle shard: {err}"
    );
    // Quantised weights (the default exact mode keeps GGUF blocks) cannot be trained: a clear
    // error naming the way out, not a wrong gradient.
    let quantised = ShardEngine::load(smollm2(), 10..11, EngineOptions::default()).expect("load");
    let err = quantised
        .train_forward(
            1,
            neuroshard_core::ShardInput::Hidden(
                Tensor::zeros((1, 2, 576), DType::F32, &Device::Cpu).expect("t"),
            ),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::Training(_)) && err.to_string().contains("--mode f32"),
        "{err}"
    );
}
