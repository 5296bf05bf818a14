//! PeerSet and route planning with a simulated clock: signed announcements accepted, forged,
//! expired, replayed, future-dated and foreign ones refused; expiry; routes over disjoint,
//! overlapping and replicated slices; banned/overloaded/excluded nodes skipped; routes for an
//! adapter over the nodes that announce it, replicas on one version.

use neuroshard_core::net::{
    Announcement, NetError, PeerSet, RouteOptions, SignedAnnouncement, PROTOCOL_VERSION,
};

const MODEL: &str = "smollm2-test";
const T0: u64 = 1_800_000_000_000;

fn key(seed: u8) -> iroh::SecretKey {
    iroh::SecretKey::from_bytes(&[seed; 32])
}

fn announce(k: &iroh::SecretKey, layers: std::ops::Range<u32>, ts: u64) -> Announcement {
    Announcement {
        protocol_version: PROTOCOL_VERSION,
        node: k.public(),
        model_id: MODEL.into(),
        versions: Vec::new(),
        layers,
        capacity: 8,
        load: 0,
        addrs: vec!["127.0.0.1:4000".parse().expect("addr")],
        entry: false,
        timestamp_ms: ts,
        expires_ms: ts + 10_000,
    }
}

fn signed(k: &iroh::SecretKey, layers: std::ops::Range<u32>, ts: u64) -> SignedAnnouncement {
    SignedAnnouncement::sign(&announce(k, layers, ts), k).expect("sign")
}

#[test]
fn accepts_valid_and_refuses_forged_expired_replayed_foreign() {
    let mut peers = PeerSet::new(MODEL);
    let (a, b) = (key(1), key(2));
    assert_eq!(
        peers.insert(&signed(&a, 0..10, T0), T0).expect("valid"),
        a.public()
    );
    // Survives the wire encoding.
    let wire = signed(&b, 10..20, T0).to_bytes().expect("bytes");
    peers
        .insert(&SignedAnnouncement::from_bytes(&wire).expect("decode"), T0)
        .expect("valid");
    assert_eq!(peers.len(), 2);

    // Forged: B's key signs an announcement naming A.
    let forged = SignedAnnouncement::sign(&announce(&a, 0..30, T0 + 1), &b);
    assert!(matches!(forged, Err(NetError::BadSignature(_))));
    // Forged: a valid signature with a tampered body.
    let mut tampered = signed(&a, 0..10, T0 + 1);
    let last = tampered.body.len() - 1;
    tampered.body[last] ^= 1;
    assert!(matches!(
        peers.insert(&tampered, T0),
        Err(NetError::BadSignature(_) | NetError::Malformed(_))
    ));
    // Forged: signature bytes from another message.
    let mut swapped = signed(&a, 0..10, T0 + 2);
    swapped.signature = signed(&a, 0..10, T0 + 3).signature;
    assert!(matches!(
        peers.insert(&swapped, T0),
        Err(NetError::BadSignature(_))
    ));
    // Replayed: the same announcement again, and an older one.
    assert!(matches!(
        peers.insert(&signed(&a, 0..10, T0), T0 + 5),
        Err(NetError::Replayed { .. })
    ));
    assert!(matches!(
        peers.insert(&signed(&a, 0..10, T0 - 1), T0 + 5),
        Err(NetError::Replayed { .. })
    ));
    // Expired and future-dated.
    assert!(matches!(
        peers.insert(&signed(&key(3), 0..10, T0), T0 + 20_000),
        Err(NetError::Expired { .. })
    ));
    assert!(matches!(
        peers.insert(&signed(&key(3), 0..10, T0 + 60_000), T0),
        Err(NetError::FromTheFuture { .. })
    ));
    // Other model, other protocol.
    let mut other = announce(&key(4), 0..10, T0);
    other.model_id = "another-model".into();
    assert!(matches!(
        peers.insert(
            &SignedAnnouncement::sign(&other, &key(4)).expect("sign"),
            T0
        ),
        Err(NetError::WrongModel { .. })
    ));
    let mut old = announce(&key(5), 0..10, T0);
    old.protocol_version = PROTOCOL_VERSION + 1;
    assert!(matches!(
        peers.insert(&SignedAnnouncement::sign(&old, &key(5)).expect("sign"), T0),
        Err(NetError::WrongProtocol { .. })
    ));
    // Garbage bytes.
    assert!(matches!(
        SignedAnnouncement::from_bytes(&[0xff; 7]),
        Err(NetError::Malformed(_))
    ));
    assert_eq!(peers.len(), 2);
    // A newer announcement replaces the old one.
    peers
        .insert(&signed(&a, 0..15, T0 + 100), T0 + 100)
        .expect("newer");
    assert_eq!(
        peers.get(&a.public()).expect("a").announcement.layers,
        0..15
    );
}

#[test]
fn silent_nodes_expire_and_replays_stay_refused() {
    let mut peers = PeerSet::new(MODEL);
    let a = key(1);
    peers.insert(&signed(&a, 0..10, T0), T0).expect("valid");
    assert!(peers.expire(T0 + 9_999).is_empty());
    assert_eq!(peers.expire(T0 + 10_000), vec![a.public()]);
    assert!(peers.is_empty());
    // Its old announcement replayed after expiry (still unexpired itself is impossible, so
    // replay one with a later expiry but the same timestamp).
    let mut ann = announce(&a, 0..10, T0);
    ann.expires_ms = T0 + 100_000;
    let replay = SignedAnnouncement::sign(&ann, &a).expect("sign");
    assert!(matches!(
        peers.insert(&replay, T0 + 20_000),
        Err(NetError::Replayed { .. })
    ));
}

#[test]
fn routes_cover_all_layers_cheaply() {
    let mut peers = PeerSet::new(MODEL);
    let (a, b, c) = (key(1), key(2), key(3));
    for (k, r) in [(&a, 0..10), (&b, 10..20), (&c, 20..30)] {
        peers.insert(&signed(k, r, T0), T0).expect("insert");
    }
    let opts = RouteOptions::default();
    let route = peers.plan_route(30, T0, &opts).expect("route");
    let hops: Vec<_> = route
        .hops
        .iter()
        .map(|h| (h.node, h.layers.clone()))
        .collect();
    assert_eq!(
        hops,
        vec![
            (a.public(), 0..10),
            (b.public(), 10..20),
            (c.public(), 20..30)
        ]
    );

    // A node holding everything is one hop: cheaper than three network hops.
    let whole = key(9);
    peers
        .insert(&signed(&whole, 0..30, T0), T0)
        .expect("insert");
    let route = peers.plan_route(30, T0, &opts).expect("route");
    assert_eq!(route.hops.len(), 1);
    assert_eq!(route.hops[0].node, whole.public());
    // Excluding it (failover) falls back to the three slices.
    let route = peers
        .plan_route(
            30,
            T0,
            &RouteOptions {
                exclude: vec![whole.public()],
                ..opts.clone()
            },
        )
        .expect("route");
    assert_eq!(route.hops.len(), 3);
    // Banned and overloaded nodes are skipped too.
    peers.ban(&whole.public(), T0 + 1000);
    assert_eq!(
        peers.plan_route(30, T0, &opts).expect("route").hops.len(),
        3
    );
    assert_eq!(
        peers
            .plan_route(30, T0 + 1000, &opts)
            .expect("route")
            .hops
            .len(),
        1,
        "ban lifted"
    );
    let mut busy = announce(&whole, 0..30, T0 + 1);
    busy.load = busy.capacity;
    peers
        .insert(
            &SignedAnnouncement::sign(&busy, &whole).expect("sign"),
            T0 + 1,
        )
        .expect("insert");
    assert_eq!(
        peers
            .plan_route(30, T0 + 1000, &opts)
            .expect("route")
            .hops
            .len(),
        3
    );
}

#[test]
fn overlapping_slices_and_replicas() {
    let mut peers = PeerSet::new(MODEL);
    let (a, b, c) = (key(1), key(2), key(3));
    for (k, r) in [(&a, 0..12), (&b, 8..20), (&c, 18..30)] {
        peers.insert(&signed(k, r, T0), T0).expect("insert");
    }
    let route = peers
        .plan_route(30, T0, &RouteOptions::default())
        .expect("route");
    let ranges: Vec<_> = route.hops.iter().map(|h| h.layers.clone()).collect();
    assert_eq!(ranges.len(), 3);
    assert_eq!(ranges[0].start, 0);
    assert_eq!(ranges[2].end, 30);
    assert!(
        ranges.windows(2).all(|w| w[0].end == w[1].start),
        "{ranges:?}"
    );
    // A replica of the middle slice.
    let b2 = key(4);
    peers.insert(&signed(&b2, 8..20, T0), T0).expect("insert");
    let mut replicas = peers.replicas(&(12..20), T0);
    replicas.sort_by_key(|k| *k.as_bytes());
    let mut want = vec![b.public(), b2.public()];
    want.sort_by_key(|k| *k.as_bytes());
    assert_eq!(replicas, want);
    // A measured slow replica loses to the fast one.
    peers.record_latency(&b.public(), 50.0);
    let route = peers
        .plan_route(30, T0, &RouteOptions::default())
        .expect("route");
    assert!(route.hops.iter().any(|h| h.node == b2.public()));
    assert!(route.hops.iter().all(|h| h.node != b.public()));
    // Missing layers are reported.
    peers.remove(&c.public());
    let err = peers
        .plan_route(30, T0, &RouteOptions::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            NetError::NoRoute {
                from: 20,
                to: 30,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn ttl_caps_and_pruning_bound_the_view() {
    let mut peers = PeerSet::new(MODEL);
    // An announcement valid for an hour: refused (a node must re-announce within 5 min).
    let k = key(40);
    let mut long = announce(&k, 0..30, T0);
    long.expires_ms = T0 + 3_600_000;
    let long = SignedAnnouncement::sign(&long, &k).expect("sign");
    assert!(matches!(
        peers.insert(&long, T0),
        Err(NetError::Refused { .. })
    ));
    // A flood of fresh identities fills the view to its cap and no further.
    for i in 0..neuroshard_core::net::peers::MAX_PEERS as u32 {
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&i.to_le_bytes());
        seed[31] = 7;
        let k = iroh::SecretKey::from_bytes(&seed);
        peers
            .insert(&signed(&k, 0..30, T0), T0)
            .expect("under the cap");
    }
    let late = key(41);
    assert!(matches!(
        peers.insert(&signed(&late, 0..30, T0), T0),
        Err(NetError::Refused { .. })
    ));
    // Once the flood expires, the view empties and new nodes are accepted again; the replay
    // marks of the gone nodes are pruned after the longest TTL.
    let later = T0 + 20_000;
    peers
        .insert(&signed(&late, 0..30, later), later)
        .expect("after expiry");
    assert_eq!(peers.len(), 1);
    assert!(peers.replay_marks() > 1);
    let much_later = later + 10 * 60_000;
    peers.expire(much_later);
    assert_eq!(peers.replay_marks(), 0);
}

#[test]
fn a_sybil_claiming_every_layer_does_not_beat_proven_nodes() {
    let mut peers = PeerSet::new(MODEL);
    let honest = [key(50), key(51), key(52)];
    for (k, layers) in honest.iter().zip([0..10, 10..20, 20..30]) {
        peers.insert(&signed(k, layers, T0), T0).expect("honest");
    }
    let sybil = key(53);
    peers.insert(&signed(&sybil, 0..30, T0), T0).expect("sybil");
    let opts = RouteOptions::default();
    // Nothing proven yet: one hop beats three.
    let route = peers.plan_route(30, T0, &opts).expect("route");
    assert_eq!(route.hops.len(), 1);
    // The honest nodes served sessions; the new node has not: it loses every route.
    let mut track = neuroshard_core::net::TrackRecord::default();
    for _ in 0..neuroshard_core::net::peers::PROBATION_SESSIONS {
        for k in &honest {
            track.record(k.public(), true);
        }
    }
    track.apply(&mut peers);
    let route = peers.plan_route(30, T0, &opts).expect("route");
    let nodes: Vec<_> = route.hops.iter().map(|h| h.node).collect();
    assert_eq!(nodes, honest.iter().map(|k| k.public()).collect::<Vec<_>>());
    // A proven node that keeps failing loses to a replica that does not.
    let replica = key(54);
    peers
        .insert(&signed(&replica, 10..20, T0), T0)
        .expect("replica");
    for _ in 0..3 {
        track.record(replica.public(), true);
    }
    for _ in 0..3 {
        track.record(honest[1].public(), false);
    }
    track.apply(&mut peers);
    let route = peers.plan_route(30, T0, &opts).expect("route");
    assert_eq!(route.hops[1].node, replica.public());
    // Without the proven middle alternatives, the unproven node still serves.
    let opts = RouteOptions {
        exclude: vec![honest[1].public(), replica.public()],
        ..RouteOptions::default()
    };
    let route = peers.plan_route(30, T0, &opts).expect("route");
    assert!(route.hops.iter().any(|h| h.node == sybil.public()));
}

#[test]
fn replicated_plans_use_ranges_that_k_nodes_hold() {
    let mut peers = PeerSet::new(MODEL);
    // Three replicas of 0..15 and of 15..30, one node with everything, one odd slice.
    let slices = [
        (1, 0..15),
        (2, 0..15),
        (3, 0..15),
        (4, 15..30),
        (5, 15..30),
        (6, 15..30),
        (7, 0..30),
        (8, 0..20),
    ];
    for (seed, r) in slices.clone() {
        peers
            .insert(&signed(&key(seed), r, T0), T0)
            .expect("insert");
    }
    let opts = RouteOptions::default();
    let plan = peers.plan_replicated(30, 3, T0, &opts).expect("plan");
    let ranges: Vec<_> = plan.iter().map(|r| r.layers.clone()).collect();
    // 0..30 has only one holder, 0..20 two: the plan splits at 15, where each side has 3+.
    assert_eq!(ranges, vec![0..15, 15..30]);
    let holders = |i: usize| -> Vec<u8> {
        let mut seeds: Vec<u8> = plan[i]
            .hops
            .iter()
            .map(|h| {
                (1..=8)
                    .find(|s| key(*s).public() == h.node)
                    .expect("a known node")
            })
            .collect();
        seeds.sort();
        seeds
    };
    // Every node that can run the range is offered (the caller picks the voters).
    assert_eq!(holders(0), vec![1, 2, 3, 7, 8]);
    assert_eq!(holders(1), vec![4, 5, 6, 7]);
    assert!(plan
        .iter()
        .all(|r| r.hops.iter().all(|h| h.layers == r.layers)));
    // Excluding two replicas of 15..30 leaves two holders there: k = 3 has no plan.
    let opts = RouteOptions {
        exclude: vec![key(4).public(), key(5).public()],
        ..RouteOptions::default()
    };
    let err = peers.plan_replicated(30, 3, T0, &opts).unwrap_err();
    assert!(matches!(err, NetError::NoRoute { .. }), "{err}");
    assert!(peers.plan_replicated(30, 2, T0, &opts).is_ok());
}

/// Announced versions steer routes (issue 16): an adapter's routes use only nodes that
/// announce it, its replicas vote only with replicas on the same version of it, untrained
/// base weights are one version whatever their hash, trained ones are not, and an
/// announcement with too many versions is refused.
#[test]
fn routes_for_an_adapter_use_its_holders_and_replicas_on_one_version() {
    use neuroshard_core::net::{AnnouncedVersion, MAX_ANNOUNCED_VERSIONS};
    let version = |adapter: Option<&str>, steps: u64, state: u8| AnnouncedVersion {
        adapter: adapter.map(str::to_string),
        steps,
        state: [state; 32],
    };
    let mut peers = PeerSet::new(MODEL);
    // 0..15: nodes 1 and 2 hold "notes" at step 5, node 3 at step 4, node 4 not at all;
    // 15..30: nodes 5 and 6 hold it at step 5, node 7 does not. Base weights: untrained
    // everywhere, with different state hashes (f32 and quantised slices).
    /// (node seed, layers, the adapter's (steps, state byte) if it holds it)
    type Slice = (u8, std::ops::Range<u32>, Option<(u64, u8)>);
    let slices: [Slice; 7] = [
        (1, 0..15, Some((5, 0xa1))),
        (2, 0..15, Some((5, 0xa1))),
        (3, 0..15, Some((4, 0xa0))),
        (4, 0..15, None),
        (5, 15..30, Some((5, 0xb1))),
        (6, 15..30, Some((5, 0xb1))),
        (7, 15..30, None),
    ];
    for (seed, layers, notes) in slices.clone() {
        let mut a = announce(&key(seed), layers, T0);
        a.versions.push(version(None, 0, seed));
        if let Some((steps, state)) = notes {
            a.versions.push(version(Some("notes"), steps, state));
        }
        let s = SignedAnnouncement::sign(&a, &key(seed)).expect("sign");
        peers.insert(&s, T0).expect("insert");
    }
    let seed_of = |node: &iroh::PublicKey| -> u8 {
        (1..=7).find(|s| key(*s).public() == *node).expect("known")
    };
    let for_notes = RouteOptions {
        adapter: Some("notes".into()),
        ..RouteOptions::default()
    };
    // Unreplicated: every hop announces the adapter.
    let route = peers.plan_route(30, T0, &for_notes).expect("route");
    assert!(route
        .hops
        .iter()
        .all(|h| ![4, 7].contains(&seed_of(&h.node))));
    // A replica a step behind (node 3) leaves the adapter's routes until it syncs, even when
    // the nodes ahead of it are excluded (it would mix two trainings in one route).
    let without_newest = RouteOptions {
        exclude: [1, 2].iter().map(|s| key(*s).public()).collect(),
        ..for_notes.clone()
    };
    assert!(peers.plan_route(30, T0, &without_newest).is_err());
    // Who syncs what from whom: the replicas of 0..15 behind or without "notes" fetch step 5
    // from a same-layers holder; the holders and the nodes of the other range's holders
    // fetch nothing from the wrong layers.
    use neuroshard_core::internals::adapters_to_sync;
    let plans = |seed: u8| {
        adapters_to_sync(&key(seed).public(), &peers, T0)
            .into_iter()
            .map(|p| (p.adapter, seed_of(&p.peer), p.steps))
            .collect::<Vec<_>>()
    };
    for behind in [3, 4] {
        let got = plans(behind);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].0 == "notes" && [1, 2].contains(&got[0].1) && got[0].2 == 5,
            "{got:?}"
        );
    }
    let got = plans(7);
    assert!(
        got.len() == 1 && [5, 6].contains(&got[0].1) && got[0].2 == 5,
        "{got:?}"
    );
    for ahead in [1, 2, 5, 6] {
        assert!(plans(ahead).is_empty(), "node {ahead}: {:?}", plans(ahead));
    }
    // Replicated: the holders offered per range share one version (node 3 is a step behind).
    let plan = peers.plan_replicated(30, 2, T0, &for_notes).expect("plan");
    let holders: Vec<Vec<u8>> = plan
        .iter()
        .map(|r| {
            let mut s: Vec<u8> = r.hops.iter().map(|h| seed_of(&h.node)).collect();
            s.sort();
            s
        })
        .collect();
    assert_eq!(holders, vec![vec![1, 2], vec![5, 6]]);
    // Three replicas on one version of the adapter do not exist.
    assert!(peers.plan_replicated(30, 3, T0, &for_notes).is_err());
    // The base weights: untrained everywhere, so every node is a replica of its range.
    let base = peers
        .plan_replicated(30, 3, T0, &RouteOptions::default())
        .expect("base plan");
    assert_eq!(base[0].hops.len(), 4);
    assert_eq!(base[1].hops.len(), 3);
    // An adapter nobody serves has no route.
    let unknown = RouteOptions {
        adapter: Some("nobody".into()),
        ..RouteOptions::default()
    };
    assert!(matches!(
        peers.plan_route(30, T0, &unknown),
        Err(NetError::NoRoute { .. })
    ));
    // Base weights trained on one node (full training) split it from the others.
    let mut trained = announce(&key(4), 0..15, T0 + 1);
    trained.versions.push(version(None, 3, 0x44));
    peers
        .insert(
            &SignedAnnouncement::sign(&trained, &key(4)).expect("sign"),
            T0,
        )
        .expect("insert");
    let base = peers
        .plan_replicated(30, 3, T0, &RouteOptions::default())
        .expect("base plan");
    assert!(base[0].hops.iter().all(|h| seed_of(&h.node) != 4));

    // Too many versions in one announcement are refused.
    let mut flood = announce(&key(9), 0..30, T0);
    flood.versions = (0..=MAX_ANNOUNCED_VERSIONS as u64)
        .map(|i| version(Some(&format!("a{i}")), i, 0))
        .collect();
    let err = peers
        .insert(
            &SignedAnnouncement::sign(&flood, &key(9)).expect("sign"),
            T0,
        )
        .unwrap_err();
    assert!(matches!(err, NetError::Refused { .. }), "{err}");
}
