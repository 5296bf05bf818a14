//! [`SentStates`]: the hidden states a hop sent for one session, indexed by position, so it can
//! replay positions `0..p` into a successor that replaced a failed node.

/// Rows of `width` f32 values, row `p` being what the successor received for position `p`
/// (after the session's codec, so a replay is bit-identical to the original relay).
#[derive(Debug, Default, Clone)]
pub(crate) struct SentStates {
    width: usize,
    rows: Vec<f32>,
}

impl SentStates {
    /// Positions recorded.
    pub(crate) fn positions(&self) -> usize {
        self.rows.len().checked_div(self.width).unwrap_or(0)
    }

    /// Bytes the record holds.
    pub(crate) fn bytes(&self) -> usize {
        self.rows.capacity() * std::mem::size_of::<f32>()
    }

    /// Row width (0 while empty).
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// Records `values` (rows of `width`) sent for positions `start..`. A retried position
    /// overwrites; a write past the end (a gap) or of another width restarts the record, and a
    /// replay needing the missing positions is then refused instead of sending wrong states.
    pub(crate) fn record(&mut self, start: usize, width: usize, values: &[f32]) {
        if width == 0 || values.len() % width != 0 {
            return;
        }
        if width != self.width || start > self.positions() {
            self.rows.clear();
            self.width = width;
            if start > 0 {
                return;
            }
        }
        self.rows.truncate(start * width);
        self.rows.extend_from_slice(values);
    }

    /// The rows of positions `0..upto`, if all are recorded.
    pub(crate) fn prefix(&self, upto: usize) -> Option<&[f32]> {
        (upto <= self.positions()).then(|| &self.rows[..upto * self.width])
    }

    /// Replaces the record (a hand-over from a leaving node).
    pub(crate) fn replace(&mut self, width: usize, rows: Vec<f32>) {
        self.width = width;
        self.rows = rows;
    }
}

#[cfg(test)]
mod tests {
    use super::SentStates;

    #[test]
    fn positions_overwrite_and_gaps_restart() {
        let mut s = SentStates::default();
        s.record(0, 2, &[1., 1., 2., 2., 3., 3.]);
        s.record(3, 2, &[4., 4.]);
        assert_eq!(s.positions(), 4);
        s.record(2, 2, &[9., 9.]);
        assert_eq!(s.prefix(3), Some(&[1., 1., 2., 2., 9., 9.][..]));
        assert_eq!(
            s.prefix(4),
            None,
            "position 3 was dropped by the overwrite at 2"
        );
        s.record(5, 2, &[7., 7.]);
        assert_eq!(s.positions(), 0, "a gap restarts the record");
        assert_eq!(s.prefix(1), None);
        assert_eq!(s.prefix(0), Some(&[][..]));
    }
}
