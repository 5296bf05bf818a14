//! `ns_swarm_*` (a whole swarm in this process) and `ns_node_*` (one node), over
//! `neuroshard_core::blocking`.

use crate::engine::ns_mode;
use crate::status::{arg_str, arg_strs, fail, fail_with, guard, ns_status, out_ptr, owned_string};
use neuroshard_core::{blocking, EngineOptions, Node};
use std::ffi::c_char;

/// A local swarm (opaque; free with `ns_swarm_free`).
pub struct ns_swarm {
    swarm: blocking::LocalSwarm,
}

/// A node (opaque; free with `ns_node_free`).
pub struct ns_node {
    node: blocking::Node,
}

/// Starts `nodes` slices x `replicas` nodes of the model at `model` on 127.0.0.1.
#[no_mangle]
pub unsafe extern "C" fn ns_swarm_start(
    model: *const c_char,
    nodes: u32,
    replicas: u32,
    mode: ns_mode,
    out: *mut *mut ns_swarm,
) -> ns_status {
    guard(|| {
        // SAFETY: arg_str checks for null.
        let model = match unsafe { arg_str(model, "model") } {
            Ok(m) => m,
            Err(s) => return s,
        };
        if let Err(s) = out_ptr(out, "out") {
            return s;
        }
        if nodes == 0 {
            return fail_with(ns_status::InvalidArgument, "nodes must be at least 1");
        }
        let options = EngineOptions {
            mode: mode.into(),
            ..EngineOptions::default()
        };
        match blocking::LocalSwarm::start(model, nodes as usize, replicas.max(1) as usize, options)
        {
            Ok(swarm) => {
                // SAFETY: checked non-null.
                unsafe { *out = Box::into_raw(Box::new(ns_swarm { swarm })) };
                ns_status::Ok
            }
            Err(e) => fail(e),
        }
    })
}

/// The first node's address line (`<id>@<ip:port>`), for `ns_client_connect`. Free the
/// string with `ns_string_free`.
#[no_mangle]
pub unsafe extern "C" fn ns_swarm_address(
    swarm: *const ns_swarm,
    out: *mut *mut c_char,
) -> ns_status {
    guard(|| {
        if swarm.is_null() {
            return fail_with(ns_status::NullArgument, "swarm is null");
        }
        if let Err(s) = out_ptr(out, "out") {
            return s;
        }
        // SAFETY: checked non-null; a live handle.
        let address = unsafe { &(*swarm).swarm }.address();
        // SAFETY: checked non-null.
        unsafe { *out = owned_string(&address) };
        ns_status::Ok
    })
}

/// Stops every node and frees the swarm (null is ignored).
#[no_mangle]
pub unsafe extern "C" fn ns_swarm_free(swarm: *mut ns_swarm) {
    if !swarm.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: from Box::into_raw in ns_swarm_start, freed once.
            let mut swarm = unsafe { Box::from_raw(swarm) };
            let _ = swarm.swarm.close();
        }));
    }
}

/// Starts a node serving layers `[start, end)` of `model` on 127.0.0.1:`port` (0: any),
/// joining the swarm through `peers` (`n_peers` address lines; may be null when 0).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ns_node_start(
    model: *const c_char,
    start: u32,
    end: u32,
    port: u16,
    peers: *const *const c_char,
    n_peers: usize,
    mode: ns_mode,
    out: *mut *mut ns_node,
) -> ns_status {
    guard(|| {
        // SAFETY: arg_str / arg_strs check for null.
        let model = match unsafe { arg_str(model, "model") } {
            Ok(m) => m,
            Err(s) => return s,
        };
        // SAFETY: as above.
        let peers = match unsafe { arg_strs(peers, n_peers, "peers") } {
            Ok(p) => p,
            Err(s) => return s,
        };
        if let Err(s) = out_ptr(out, "out") {
            return s;
        }
        let bootstrap = if peers.is_empty() {
            Vec::new()
        } else {
            match blocking::resolve_peers(&peers) {
                Ok(b) => b,
                Err(e) => return fail(e),
            }
        };
        let builder = Node::builder(model)
            .layers(start as usize..end as usize)
            .mode(mode.into())
            .port(port)
            .peers(bootstrap);
        match blocking::Node::start(builder) {
            Ok(node) => {
                // SAFETY: checked non-null.
                unsafe { *out = Box::into_raw(Box::new(ns_node { node })) };
                ns_status::Ok
            }
            Err(e) => fail(e),
        }
    })
}

/// The node's address line (`<id>@<ip:port>`). Free the string with `ns_string_free`.
#[no_mangle]
pub unsafe extern "C" fn ns_node_address(node: *const ns_node, out: *mut *mut c_char) -> ns_status {
    guard(|| {
        if node.is_null() {
            return fail_with(ns_status::NullArgument, "node is null");
        }
        if let Err(s) = out_ptr(out, "out") {
            return s;
        }
        // SAFETY: checked non-null; a live handle.
        match unsafe { &(*node).node }.address() {
            Ok(address) => {
                // SAFETY: checked non-null.
                unsafe { *out = owned_string(&address) };
                ns_status::Ok
            }
            Err(e) => fail(e),
        }
    })
}

/// Stops and frees a node (null is ignored).
#[no_mangle]
pub unsafe extern "C" fn ns_node_free(node: *mut ns_node) {
    if !node.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: from Box::into_raw in ns_node_start, freed once.
            let mut node = unsafe { Box::from_raw(node) };
            let _ = node.node.close();
        }));
    }
}
