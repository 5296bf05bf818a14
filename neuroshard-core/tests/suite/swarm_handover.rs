//! Graceful leave with KV-cache hand-over in a 3-slice x 2-replica swarm on 127.0.0.1: the
//! first, a middle and the last hop leave mid-generation. Each tells the client which replica
//! can take the session; at the next step boundary the client moves the hop and the leaving
//! node sends its KV cache. The text must equal the undisturbed reference with no failover,
//! no refill and no replay anywhere, the leaving node must have served steps before and the
//! replica after.

use crate::common::*;
use neuroshard_core::wire::Codec;
use neuroshard_core::GenerationConfig;
use neuroshard_core::LeaveReport;
use neuroshard_core::SessionStats;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_hops_hand_their_kv_cache_over() {
    let mut swarm = smollm2_swarm(3, 2).await;
    let client = new_client().await;
    let (prompt, expected) = smollm2_prompt_and_greedy();
    for leaving_hop in 0..3 {
        let route = swarm.plan().expect("plan");
        let victim = swarm
            .nodes
            .iter()
            .find(|n| n.id() == route[leaving_hop].node)
            .cloned()
            .expect("victim");
        let replica = swarm
            .nodes
            .iter()
            .find(|n| n.id() != victim.id() && n.engine().layers() == victim.engine().layers())
            .cloned()
            .expect("replica");
        let before: Vec<_> = swarm.nodes.iter().map(|n| n.stats()).collect();
        let replica_before = replica.stats();
        let steps_at_leave = Arc::new(Mutex::new(None));
        let leave_task = Arc::new(Mutex::new(None));
        let (seen, task, handle, leaver) = (
            steps_at_leave.clone(),
            leave_task.clone(),
            tokio::runtime::Handle::current(),
            victim.clone(),
        );
        let mut pieces = 0;
        let on_text = Box::new(move |_: &str| {
            pieces += 1;
            if pieces == 8 {
                // Between two steps: the node announces it is leaving, then waits for the
                // hand-over while the generation goes on.
                *seen.lock().expect("lock") = Some(leaver.stats().steps);
                let leave = handle.block_on(leaver.begin_leave());
                assert_eq!(leave.notified, 1, "one live session to move");
                assert_eq!(leave.without_replica, 0);
                *task.lock().expect("lock") =
                    Some(handle.spawn(leave.finish(Duration::from_secs(30))));
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
        assert_eq!(out.tokens, expected, "hop {leaving_hop} left: text changed");
        assert_eq!(
            stats,
            SessionStats {
                handovers: 1,
                ..SessionStats::default()
            },
            "hop {leaving_hop}: moved by hand-over only"
        );
        let join = leave_task.lock().expect("lock").take().expect("left");
        let report: LeaveReport = join.await.expect("leave task");
        assert_eq!(report.handed_over, 1);
        assert_eq!(report.left_behind, 0);
        let at_leave = steps_at_leave.lock().expect("lock").expect("left");
        assert!(at_leave >= 8, "leaving node served {at_leave} steps before");
        let after: Vec<_> = swarm.nodes.iter().map(|n| n.stats()).collect();
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert_eq!(a.fills, b.fills, "node {i} was refilled: a replay happened");
            assert_eq!(a.replays, b.replays, "node {i} replayed");
        }
        let replica_after = replica.stats();
        assert_eq!(replica_after.handovers_in, 1, "replica imported the cache");
        assert!(
            replica_after.steps > replica_before.steps,
            "hop {leaving_hop}: replica never served"
        );
        assert_eq!(victim.stats().handovers_out, 1);
        assert_eq!(victim.stats().sessions_open, 0);
        swarm.nodes.retain(|n| n.id() != victim.id());
    }
    client.shutdown().await;
    swarm.shutdown().await;
}

/// A replica that died moments ago is still announced (its announcement lives until its TTL
/// runs out), but a leaving node must not propose it: the client would be sent to a dead node
/// and the clean hand-over would become a failover. With no live replica the leaving node
/// says so, and the session keeps running on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_is_never_proposed() {
    let mut swarm = smollm2_swarm(3, 2).await;
    let client = new_client().await;
    let (prompt, expected) = smollm2_prompt_and_greedy();
    // Kill one replica of the middle slice; the survivors still hold its announcement.
    let middle = swarm.nodes[0].engine().layers().end;
    let dead = swarm
        .nodes
        .iter()
        .find(|n| n.engine().layers().start == middle)
        .cloned()
        .expect("middle node");
    dead.shutdown().await;
    swarm.nodes.retain(|n| n.id() != dead.id());
    let survivor = swarm
        .nodes
        .iter()
        .find(|n| n.engine().layers().start == middle)
        .cloned()
        .expect("surviving middle node");
    assert!(
        survivor.peers().iter().any(|(id, _)| *id == dead.id()),
        "the dead node's announcement is still held"
    );
    let handle = tokio::runtime::Handle::current();
    let leaver = survivor.clone();
    let mut pieces = 0;
    let on_text = Box::new(move |_: &str| {
        pieces += 1;
        if pieces == 8 {
            let leave = handle.block_on(leaver.begin_leave());
            assert_eq!(leave.notified, 1, "one live session");
            assert_eq!(leave.without_replica, 1, "the dead replica was proposed");
        }
    });
    let config = GenerationConfig {
        max_tokens: expected.len(),
        ignore_eos: true,
        ..GenerationConfig::default()
    };
    let (out, stats) = swarm
        .generate_with_stats(&client, prompt, config, Codec::F16, on_text)
        .await
        .expect("generate");
    assert_eq!(out.tokens, expected);
    assert_eq!(stats, SessionStats::default(), "nothing moved");
    client.shutdown().await;
    swarm.shutdown().await;
}
