//! Batched decode across sessions on the real SmolLM2: `ShardEngine::forward_batch` runs the
//! one-position steps of several sessions as one batch, and every session's logits have exactly
//! the bits of its solo step, at batch sizes 2, 8, 16 and 17 (around the old dense-path row
//! threshold of 16 and the kernels' groups of four), with sessions at mixed context lengths.

use crate::common::*;
use neuroshard_core::{
    EngineOptions, ForwardRequest, LogitsSelection, ShardEngine, ShardInput, ShardOutput,
};

fn step(session: u64, token: u32, position: usize) -> ForwardRequest {
    ForwardRequest {
        session: Some(session),
        start_pos: position,
        logits: LogitsSelection::Last,
        adapter: None,
        ..ForwardRequest::new(ShardInput::tokens_from_slice(&[token], 1, 1).expect("input"))
    }
}

fn bits(out: &ShardOutput) -> Vec<u32> {
    let (values, _) = out.to_f32_vec().expect("values");
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn batched_decode_steps_have_their_solo_bits() {
    let engine = ShardEngine::load(smollm2(), 0..30, EngineOptions::default()).expect("load");
    let (prompt, _) = smollm2_prompt_and_greedy();
    let sessions = 17u64;
    // Session s holds a prompt of 3 + 5s tokens (3..83 positions): mixed contexts, so every
    // row of a batch attends over a different number of keys.
    let mut lengths = Vec::new();
    for s in 0..sessions {
        let len = 3 + 5 * s as usize;
        let ids: Vec<u32> = prompt
            .iter()
            .cycle()
            .skip(s as usize)
            .take(len)
            .copied()
            .collect();
        engine.open_session(s).expect("open");
        let input = ShardInput::tokens_from_slice(&ids, 1, len).expect("input");
        engine
            .forward(ForwardRequest {
                session: Some(s),
                ..ForwardRequest::new(input)
            })
            .expect("prefill");
        lengths.push(len);
    }
    let token = |s: u64| prompt[s as usize % prompt.len()];
    // Each session's next step alone, then rolled back.
    let solo: Vec<Vec<u32>> = (0..sessions)
        .map(|s| {
            let out = engine
                .forward(step(s, token(s), lengths[s as usize]))
                .expect("solo step");
            engine
                .truncate_session(s, lengths[s as usize])
                .expect("roll back");
            bits(&out)
        })
        .collect();
    for batch in [2u64, 8, 16, 17] {
        let before = engine.stats();
        let reqs = (0..batch)
            .map(|s| step(s, token(s), lengths[s as usize]))
            .collect();
        let outs = engine.forward_batch(reqs);
        assert_eq!(outs.len(), batch as usize);
        for (s, out) in outs.into_iter().enumerate() {
            let out = out.expect("batched step");
            assert!(
                bits(&out) == solo[s],
                "batch of {batch}: session {s}'s logits differ from its solo step"
            );
            engine
                .truncate_session(s as u64, lengths[s])
                .expect("roll back");
        }
        let after = engine.stats();
        assert_eq!(
            after.decode_batches,
            before.decode_batches + 1,
            "one batch formed"
        );
        assert_eq!(after.batched_steps, before.batched_steps + batch);
    }
}

#[test]
fn requests_that_cannot_join_run_alone_with_their_errors() {
    let engine = ShardEngine::load(smollm2(), 0..30, EngineOptions::default()).expect("load");
    let (prompt, _) = smollm2_prompt_and_greedy();
    let prompt: Vec<u32> = prompt.iter().cycle().take(8).copied().collect();
    for s in 0..2 {
        engine.open_session(s).expect("open");
        let input = ShardInput::tokens_from_slice(&prompt[..4], 1, 4).expect("input");
        engine
            .forward(ForwardRequest {
                session: Some(s),
                ..ForwardRequest::new(input)
            })
            .expect("prefill");
    }
    let outs = engine.forward_batch(vec![
        step(0, prompt[4], 4),
        // A gap: session 1 holds 4 positions.
        step(1, prompt[4], 9),
        // Unknown session.
        step(77, prompt[4], 0),
        // A prompt (two positions) runs alone.
        ForwardRequest {
            session: Some(1),
            start_pos: 4,
            logits: LogitsSelection::Last,
            adapter: None,
            ..ForwardRequest::new(ShardInput::tokens_from_slice(&prompt[4..6], 1, 2).expect("in"))
        },
    ]);
    assert!(outs[0].is_ok(), "{:?}", outs[0].as_ref().err());
    assert!(
        outs[1].is_err() && outs[2].is_err(),
        "gap and unknown session are refused"
    );
    assert!(outs[3].is_ok(), "{:?}", outs[3].as_ref().err());
    assert_eq!(
        engine.stats().decode_batches,
        0,
        "nothing could batch with session 0"
    );
}
