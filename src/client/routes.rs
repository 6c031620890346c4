//! Where the reader task hands each response: the rule that gives every
//! request id one waiter.
//!
//! A request id is a lane in its top 16 bits and a sequence number in the
//! other 48. Lane 0 holds the requests that each await their own answer
//! ([`Client::request_raw`](super::Client::request_raw)): one oneshot per
//! request, in a map. Every other lane belongs to one [`Pipeline`]
//! (super::Pipeline) attached to this connection, whose answers all go to
//! the pipeline's one queue; the pipeline, which numbers its own requests,
//! knows what each answer is for. So a pipelined request costs the reader
//! no map entry and no channel of its own.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use crate::protocol::proto::Response;

/// The bits of a request id below its lane.
pub(super) const LANE_SHIFT: u32 = 48;
/// A request id's sequence number.
pub(super) const SEQ_MASK: u64 = (1 << LANE_SHIFT) - 1;

/// What a connection tells a pipeline.
// Boxing the answer would cost an allocation per answer to save space only
// in the rare ending, in a queue that holds what is in flight.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Note {
    /// The answer to one of its requests.
    Answer(Response),
    /// The connection it attached as this source ended: nothing more will
    /// be answered through it.
    Ended(u32),
}

/// A pipeline's place on a connection.
#[derive(Debug)]
struct Lane {
    /// The lane number, the top bits of its requests' ids.
    lane: u16,
    /// Which of the pipeline's connections this is, for [`Note::Ended`].
    source: u32,
    /// The pipeline's queue.
    notes: mpsc::UnboundedSender<Note>,
}

/// The waiters of one connection's requests.
#[derive(Debug, Default)]
pub(super) struct Routes {
    /// Lane 0: each request's own oneshot, by request id.
    once: HashMap<u64, oneshot::Sender<Response>>,
    /// The pipelines attached to this connection. A handful at most, so a
    /// scan beats a map.
    lanes: Vec<Lane>,
    /// The last lane handed out. Lanes are not reused: a late answer can
    /// only ever reach the pipeline that asked.
    last_lane: u16,
}

impl Routes {
    /// Routes the answer to `request_id` (a lane-0 id) to `waiter`.
    pub(super) fn insert_once(&mut self, request_id: u64, waiter: oneshot::Sender<Response>) {
        self.once.insert(request_id, waiter);
    }

    /// Forgets a lane-0 request that will not be waited for.
    pub(super) fn forget_once(&mut self, request_id: u64) {
        self.once.remove(&request_id);
    }

    /// Opens a lane whose answers go to `notes`, tagged `source` when the
    /// connection ends; `None` once all 65,535 have been handed out.
    pub(super) fn open_lane(
        &mut self,
        source: u32,
        notes: mpsc::UnboundedSender<Note>,
    ) -> Option<u16> {
        let lane = self.last_lane.checked_add(1)?;
        self.last_lane = lane;
        self.lanes.push(Lane {
            lane,
            source,
            notes,
        });
        Some(lane)
    }

    /// Closes a dropped pipeline's lane; its late answers are dropped.
    pub(super) fn close_lane(&mut self, lane: u16) {
        self.lanes.retain(|l| l.lane != lane);
    }

    /// Hands `response` to whoever waits for it. An answer nobody waits
    /// for (a request given up, a pipeline dropped) is dropped.
    pub(super) fn answer(&mut self, response: Response) {
        match (response.request_id >> LANE_SHIFT) as u16 {
            0 => {
                if let Some(waiter) = self.once.remove(&response.request_id) {
                    let _ = waiter.send(response);
                }
            }
            lane => {
                if let Some(found) = self.lanes.iter().find(|l| l.lane == lane) {
                    let _ = found.notes.send(Note::Answer(response));
                }
            }
        }
    }

    /// The connection ended: every lane-0 waiter hears so by its sender
    /// being dropped, every pipeline by [`Note::Ended`].
    pub(super) fn end(self) {
        for lane in self.lanes {
            let _ = lane.notes.send(Note::Ended(lane.source));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(request_id: u64) -> Response {
        Response {
            request_id,
            ..Response::default()
        }
    }

    #[test]
    fn each_answer_reaches_the_waiter_of_its_lane_and_no_other() {
        let mut routes = Routes::default();
        let (once_tx, mut once_rx) = oneshot::channel();
        routes.insert_once(7, once_tx);
        let (a_tx, mut a_rx) = mpsc::unbounded_channel();
        let (b_tx, mut b_rx) = mpsc::unbounded_channel();
        let a = routes.open_lane(0, a_tx).unwrap();
        let b = routes.open_lane(1, b_tx).unwrap();
        assert_eq!((a, b), (1, 2));

        routes.answer(response(u64::from(b) << LANE_SHIFT | 7));
        routes.answer(response(7));
        // Lane 9 is nobody's: its answer is dropped.
        routes.answer(response(9 << LANE_SHIFT | 7));

        assert_eq!(once_rx.try_recv().unwrap().request_id, 7);
        assert!(a_rx.try_recv().is_err());
        assert!(matches!(b_rx.try_recv(), Ok(Note::Answer(r)) if r.request_id & SEQ_MASK == 7));
        assert!(b_rx.try_recv().is_err());

        routes.close_lane(a);
        routes.answer(response(u64::from(a) << LANE_SHIFT | 8));
        assert!(a_rx.try_recv().is_err());

        routes.end();
        assert!(a_rx.try_recv().is_err(), "a closed lane hears nothing more");
        assert!(matches!(b_rx.try_recv(), Ok(Note::Ended(1))));
    }

    #[test]
    fn lanes_are_never_handed_out_twice() {
        let mut routes = Routes::default();
        let mut seen = std::collections::HashSet::new();
        while let Some(lane) = routes.open_lane(0, mpsc::unbounded_channel().0) {
            assert!(seen.insert(lane));
        }
        assert_eq!(seen.len(), usize::from(u16::MAX));
        assert!(!seen.contains(&0), "lane 0 is the one-off requests'");
    }
}
