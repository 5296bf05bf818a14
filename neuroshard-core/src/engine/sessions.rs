//! The session table: one KV cache per open inference session, bounded in count and length,
//! closed explicitly or expired when idle.

use crate::error::{Error, Result};
use crate::model::kv_cache::{KvDtype, LayerKv};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Identifies an inference session on every hop of its route.
pub type SessionId = u64;

/// The cached state of one session on this shard.
#[derive(Debug)]
pub(crate) struct Session {
    /// One cache per layer of the shard.
    pub(crate) caches: Vec<LayerKv>,
    pub(crate) last_used: Instant,
}

impl Session {
    /// Positions cached in every layer of `layers` (relative indices).
    pub(crate) fn cached_len(&self, layers: std::ops::Range<usize>) -> usize {
        self.caches[layers]
            .iter()
            .map(LayerKv::len)
            .min()
            .unwrap_or(0)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.caches.iter().map(LayerKv::bytes).sum()
    }
}

/// Limits of the session table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    pub(crate) max_sessions: usize,
    pub(crate) max_len: usize,
    pub(crate) idle_timeout: Duration,
    /// Element type of every cache.
    pub(crate) kv_dtype: KvDtype,
}

/// All open sessions. The table lock is held only to find a session; compute holds the
/// session's own lock, so different sessions run concurrently.
#[derive(Debug)]
pub(crate) struct SessionTable {
    sessions: Mutex<HashMap<SessionId, Arc<Mutex<Session>>>>,
    pub(crate) limits: SessionLimits,
    layers: usize,
}

impl SessionTable {
    pub(crate) fn new(layers: usize, limits: SessionLimits) -> Self {
        SessionTable {
            sessions: Mutex::new(HashMap::new()),
            limits,
            layers,
        }
    }

    fn table(&self) -> Result<MutexGuard<'_, HashMap<SessionId, Arc<Mutex<Session>>>>> {
        self.sessions
            .lock()
            .map_err(Error::poisoned("session state"))
    }

    /// Opens a session; expires idle ones first if the table is full.
    pub(crate) fn open(&self, id: SessionId) -> Result<()> {
        let mut table = self.table()?;
        if table.contains_key(&id) {
            return Err(Error::SessionExists(id));
        }
        if table.len() >= self.limits.max_sessions {
            Self::expire_locked(&mut table, self.limits.idle_timeout);
        }
        if table.len() >= self.limits.max_sessions {
            return Err(Error::SessionsFull {
                max: self.limits.max_sessions,
            });
        }
        table.insert(
            id,
            Arc::new(Mutex::new(Session {
                // Sized for the length limit at most: growth never doubles past it.
                caches: vec![LayerKv::new(self.limits.kv_dtype, self.limits.max_len); self.layers],
                last_used: Instant::now(),
            })),
        );
        Ok(())
    }

    pub(crate) fn close(&self, id: SessionId) -> Result<()> {
        self.table()?
            .remove(&id)
            .map(|_| ())
            .ok_or(Error::UnknownSession(id))
    }

    pub(crate) fn get(&self, id: SessionId) -> Result<Arc<Mutex<Session>>> {
        self.table()?
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownSession(id))
    }

    /// Runs `f` on a locked session and marks it used.
    pub(crate) fn with<T>(
        &self,
        id: SessionId,
        f: impl FnOnce(&mut Session) -> Result<T>,
    ) -> Result<T> {
        let session = self.get(id)?;
        let mut guard = session.lock().map_err(Error::poisoned("session state"))?;
        guard.last_used = Instant::now();
        f(&mut guard)
    }

    fn expire_locked(
        table: &mut HashMap<SessionId, Arc<Mutex<Session>>>,
        timeout: Duration,
    ) -> usize {
        let before = table.len();
        // A session whose lock is held is in use right now and therefore not idle.
        table.retain(|_, s| match s.try_lock() {
            Ok(s) => s.last_used.elapsed() < timeout,
            Err(_) => true,
        });
        before - table.len()
    }

    /// Drops sessions idle for longer than the timeout; returns how many.
    pub(crate) fn expire_idle(&self) -> Result<usize> {
        let mut table = self.table()?;
        Ok(Self::expire_locked(&mut table, self.limits.idle_timeout))
    }

    pub(crate) fn count(&self) -> usize {
        self.table().map(|t| t.len()).unwrap_or(0)
    }

    pub(crate) fn kv_bytes(&self) -> usize {
        let Ok(table) = self.table() else { return 0 };
        table
            .values()
            .filter_map(|s| s.try_lock().ok().map(|s| s.bytes()))
            .sum()
    }
}
