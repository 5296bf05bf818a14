//! Failover in a 3-slice x 2-replica swarm on 127.0.0.1: the first, a middle and the last hop
//! are killed mid-generation (their endpoint closes between two steps). The client re-plans
//! around the dead node, moves the session and refills the replica: from the dead node's
//! predecessor's sent hidden states (the client's token ids when the first hop died), without
//! recomputing the hops before it. The text must equal the undisturbed reference, the killed
//! node must have served steps before the fault and its replica after it.

use crate::common::*;
use neuroshard_core::wire::Codec;
use neuroshard_core::GenerationConfig;
use std::sync::{Arc, Mutex};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_any_hop_mid_generation_keeps_the_text() {
    let mut swarm = smollm2_swarm(3, 2).await;
    let client = new_client().await;
    let (prompt, expected) = smollm2_prompt_and_greedy();
    for victim_hop in 0..3 {
        let route = swarm.plan().expect("plan");
        let victim = swarm
            .nodes
            .iter()
            .find(|n| n.id() == route[victim_hop].node)
            .cloned()
            .expect("victim");
        let layers = victim.engine().layers();
        let replica = swarm
            .nodes
            .iter()
            .find(|n| n.id() != victim.id() && n.engine().layers() == layers)
            .cloned()
            .expect("replica");
        let replica_before = replica.stats().steps;
        let predecessor = (victim_hop > 0).then(|| {
            swarm
                .nodes
                .iter()
                .find(|n| n.id() == route[victim_hop - 1].node)
                .cloned()
                .expect("predecessor")
        });
        let replays_before = predecessor.as_ref().map(|p| p.stats().replays);
        let fills_before = replica.stats().fills;
        let victim_steps_at_kill = Arc::new(Mutex::new(None));
        let (seen, handle) = (
            victim_steps_at_kill.clone(),
            tokio::runtime::Handle::current(),
        );
        let killer = victim.clone();
        let mut pieces = 0;
        let on_text = Box::new(move |_: &str| {
            pieces += 1;
            if pieces == 8 {
                // Runs on the generation thread, between two steps.
                *seen.lock().expect("lock") = Some(killer.stats().steps);
                handle.block_on(killer.shutdown());
            }
        });
        let config = GenerationConfig {
            max_tokens: expected.len(),
            ignore_eos: true,
            ..GenerationConfig::default()
        };
        let (out, stats) = swarm
            .generate_with_stats(&client, prompt.clone(), config, Codec::F16, on_text)
            .await
            .expect("generate");
        assert_eq!(stats.failovers, 1, "hop {victim_hop}: {stats:?}");
        assert_eq!(stats.refills, 1, "hop {victim_hop}: {stats:?}");
        assert_eq!(stats.full_replays, 0, "hop {victim_hop}: {stats:?}");
        assert_eq!(
            replica.stats().fills,
            fills_before + 1,
            "hop {victim_hop}: replica refilled once"
        );
        if let (Some(p), Some(before)) = (&predecessor, replays_before) {
            assert_eq!(
                p.stats().replays,
                before + 1,
                "hop {victim_hop}: the predecessor replayed its sent states"
            );
        }
        assert_eq!(
            out.tokens, expected,
            "hop {victim_hop} killed: text changed"
        );
        let at_kill = victim_steps_at_kill
            .lock()
            .expect("lock")
            .expect("victim was killed");
        assert!(
            at_kill >= 8,
            "hop {victim_hop}: victim served {at_kill} steps before the fault"
        );
        assert_eq!(
            victim.stats().steps,
            at_kill,
            "victim served nothing after death"
        );
        let replica_after = replica.stats().steps;
        assert!(
            replica_after > replica_before,
            "hop {victim_hop}: replica never served"
        );
        swarm.nodes.retain(|n| n.id() != victim.id());
    }
    client.shutdown().await;
    swarm.shutdown().await;
}
