//! One shard of the memory store: its sessions in a slab, their byte accounting, and the two
//! queues eviction takes them from.
//!
//! Every session is a slot of the slab, found by id through the map, and linked into one of two
//! queues by slot index:
//!
//! - **probation**, in creation order: every new session starts here;
//! - **protected**: sessions that were used again (loaded, saved or touched) after they were
//!   created, moved here by their first use.
//!
//! After that first move a use only sets the slot's `used` bit, so the hot path (load, save,
//! touch) relinks nothing. When the shard is over its bound, eviction first checks the next
//! [`SWEEP_STEP`] slots of a sweep that goes round the slab for expired sessions, then looks at
//! the head of a queue: an expired session there is removed whatever its bit; a session with
//! the bit set gets a second chance (the bit cleared, moved to the tail of protected); any
//! other is evicted.
//! Eviction takes from probation while it holds at least a tenth of the shard's sessions or
//! bytes (or protected is empty), else from protected. So a flood of new sessions that never
//! come back cycles through probation and never reaches a session that has been used twice,
//! unless the protected sessions alone outgrow nine tenths of the shard (the scheme of
//! S3-FIFO, without its ghost queue).
//!
//! One make-room passes over at most [`MAX_PASSES`] used sessions before it evicts the next
//! one whatever its bit: one create does a bounded amount of work, whatever the shard's size.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use bytes::Bytes;

use crate::error::StoreError;
use crate::key::Key;
use crate::store::{CreateOutcome, Record, SaveOutcome};

/// The bytes a session costs beyond its data, as the store counts them: its slot in the slab
/// (96 bytes), its entry in the id map (24 bytes, at the map's load factor), the allocation
/// that holds its data (an allocator header, rounding, and the shared header a load adds), and
/// the spare capacity of the slab and map as they grow by doubling. Measured by
/// `cargo bench --bench footprint` (1,000,000 sessions of 30 bytes without owners: about 190
/// resident bytes each beyond the data, before and after the slot grew from 80 bytes for the
/// owner).
pub(crate) const ENTRY_OVERHEAD: usize = 192;

/// The most used sessions one eviction passes over (giving each a second chance) before it
/// evicts the next one whatever its use.
pub(super) const MAX_PASSES: usize = 32;

/// How many slots of the slab a make-room checks for expired sessions before it evicts.
pub(super) const SWEEP_STEP: u32 = 8;

const NIL: u32 = u32::MAX;

/// The bytes an owned session counts for beyond its owner's name: its entry in the shard's
/// owner index.
const OWNER_OVERHEAD: usize = 64;

/// The bytes a session with `data_len` bytes of data counts for.
pub(crate) fn cost(data_len: usize) -> usize {
    data_len.saturating_add(ENTRY_OVERHEAD)
}

/// The bytes a record counts for: its data, its owner's name and index entry, the overhead.
fn record_cost(data_len: usize, owner: Option<&Arc<str>>) -> usize {
    cost(data_len).saturating_add(owner.map_or(0, |o| o.len() + OWNER_OVERHEAD))
}

/// Where a slot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Probation = 0,
    Protected = 1,
    /// On the free list (linked by `next`).
    Free = 2,
}

struct Slot {
    key: Key,
    version: u64,
    expires_ms: u64,
    data: Bytes,
    /// Also in the shard's owner index.
    owner: Option<Arc<str>>,
    prev: u32,
    next: u32,
    queue: Queue,
    /// Used (loaded, saved, touched) since it was created or last given a second chance.
    used: bool,
}

impl Slot {
    fn live(&self, now_ms: u64) -> bool {
        self.expires_ms > now_ms
    }

    fn cost(&self) -> usize {
        record_cost(self.data.len(), self.owner.as_ref())
    }

    fn record(&self) -> Record {
        Record::from_unix_ms(self.key, self.data.clone(), self.version, self.expires_ms)
            .with_owner(self.owner.clone())
    }
}

#[derive(Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
    len: usize,
    bytes: usize,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
        bytes: 0,
    };
}

/// The most a shard holds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) sessions: usize,
    pub(super) bytes: usize,
}

/// One shard: the map from id to slot, the slab, the two queues, the owner index and the
/// totals.
pub(super) struct Shard {
    map: HashMap<Key, u32, BuildHasherDefault<KeyHasher>>,
    /// The slots of each owner's sessions (expired ones until they are removed).
    owners: HashMap<Arc<str>, Vec<u32>>,
    slots: Vec<Slot>,
    free: u32,
    /// Where the next [`Shard::sweep_some`] starts.
    cursor: u32,
    lists: [List; 2],
    bytes: usize,
    evictions: u64,
    limits: Limits,
    /// Queue heads looked at by eviction, in total (tests check that it stays bounded).
    #[cfg(test)]
    steps: u64,
}

/// Keys are digests: their low 64 bits are a hash already.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by `Key` (which writes a u128); a plain FNV-1a keeps it correct anyway.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    #[allow(clippy::cast_possible_truncation)]
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

fn too_large(len: usize, limit: usize) -> StoreError {
    StoreError::unavailable(format!(
        "a record of {len} bytes does not fit the memory store ({limit} bytes per shard, \
         {ENTRY_OVERHEAD} of them per session)"
    ))
}

impl Shard {
    pub(super) fn new(limits: Limits) -> Self {
        Shard {
            map: HashMap::default(),
            owners: HashMap::new(),
            slots: Vec::new(),
            free: NIL,
            cursor: 0,
            lists: [List::EMPTY; 2],
            bytes: 0,
            evictions: 0,
            limits,
            #[cfg(test)]
            steps: 0,
        }
    }

    /// Sessions held, expired ones not yet removed included.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes counted: each session's data plus [`ENTRY_OVERHEAD`].
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Sessions evicted to make room so far.
    pub(super) fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The slot of the live session with this key.
    fn live(&self, key: &Key, now_ms: u64) -> Option<u32> {
        let &i = self.map.get(key)?;
        self.slots[i as usize].live(now_ms).then_some(i)
    }

    pub(super) fn load(&mut self, key: &Key, now_ms: u64) -> Option<Record> {
        let i = self.live(key, now_ms)?;
        self.mark_used(i);
        Some(self.slots[i as usize].record())
    }

    /// The live sessions of this owner.
    pub(super) fn owned(&self, owner: &str, now_ms: u64, out: &mut Vec<Record>) {
        let Some(slots) = self.owners.get(owner) else {
            return;
        };
        out.extend(
            slots
                .iter()
                .map(|&i| &self.slots[i as usize])
                .filter(|slot| slot.live(now_ms))
                .map(Slot::record),
        );
    }

    /// Adds slot `i` to its owner's entry of the index.
    fn index_owner(&mut self, i: u32) {
        if let Some(owner) = &self.slots[i as usize].owner {
            self.owners.entry(owner.clone()).or_default().push(i);
        }
    }

    /// Takes slot `i` out of its owner's entry of the index.
    fn unindex_owner(&mut self, i: u32) {
        let Some(owner) = &self.slots[i as usize].owner else {
            return;
        };
        if let Some(slots) = self.owners.get_mut(&**owner) {
            slots.retain(|&j| j != i);
            if slots.is_empty() {
                self.owners.remove(&**owner);
            }
        }
    }

    pub(super) fn create(
        &mut self,
        record: &Record,
        now_ms: u64,
    ) -> Result<CreateOutcome, StoreError> {
        let key = record.key();
        if let Some(&i) = self.map.get(&key) {
            if self.slots[i as usize].live(now_ms) {
                return Ok(CreateOutcome::IdTaken);
            }
            self.remove_slot(i);
        }
        let len = record.data().len();
        let cost = record_cost(len, record.owner_shared());
        if cost > self.limits.bytes {
            return Err(too_large(len, self.limits.bytes));
        }
        self.make_room(cost, 1, NIL, now_ms);
        let slot = Slot {
            key,
            version: record.version(),
            expires_ms: record.expires_at_unix_ms(),
            data: record.data().clone(),
            owner: record.owner_shared().cloned(),
            prev: NIL,
            next: NIL,
            queue: Queue::Free,
            used: false,
        };
        let i = if self.free == NIL {
            self.slots.push(slot);
            u32::try_from(self.slots.len() - 1).unwrap_or(NIL)
        } else {
            let i = self.free;
            self.free = self.slots[i as usize].next;
            self.slots[i as usize] = slot;
            i
        };
        self.map.insert(key, i);
        self.index_owner(i);
        self.bytes += cost;
        self.push_back(Queue::Probation, i);
        Ok(CreateOutcome::Created)
    }

    /// The slot of the live session with this id at version `expected`, or why there is none.
    fn expect(&self, key: &Key, expected: u64, now_ms: u64) -> Result<u32, SaveOutcome> {
        match self.live(key, now_ms) {
            Some(i) if self.slots[i as usize].version == expected => Ok(i),
            Some(_) => Err(SaveOutcome::Conflict),
            None => Err(SaveOutcome::Missing),
        }
    }

    pub(super) fn save(
        &mut self,
        record: &Record,
        expected: u64,
        now_ms: u64,
    ) -> Result<SaveOutcome, StoreError> {
        let i = match self.expect(&record.key(), expected, now_ms) {
            Ok(i) => i,
            Err(outcome) => return Ok(outcome),
        };
        let len = record.data().len();
        let new = record_cost(len, record.owner_shared());
        if new > self.limits.bytes {
            return Err(too_large(len, self.limits.bytes));
        }
        let old = self.slots[i as usize].cost();
        if self.slots[i as usize].owner.as_deref() != record.owner() {
            self.unindex_owner(i);
            self.slots[i as usize].owner = record.owner_shared().cloned();
            self.index_owner(i);
        }
        let slot = &mut self.slots[i as usize];
        slot.version = record.version();
        slot.expires_ms = record.expires_at_unix_ms();
        slot.data = record.data().clone();
        let list = &mut self.lists[slot.queue as usize];
        list.bytes = list.bytes - old + new;
        self.bytes = self.bytes - old + new;
        self.mark_used(i);
        if self.bytes > self.limits.bytes {
            self.make_room(0, 0, i, now_ms);
        }
        Ok(SaveOutcome::Saved)
    }

    pub(super) fn touch(
        &mut self,
        key: &Key,
        expected: u64,
        expires_ms: u64,
        now_ms: u64,
    ) -> SaveOutcome {
        match self.expect(key, expected, now_ms) {
            Ok(i) => {
                self.slots[i as usize].expires_ms = expires_ms;
                self.mark_used(i);
                SaveOutcome::Saved
            }
            Err(outcome) => outcome,
        }
    }

    pub(super) fn remove(&mut self, key: &Key, expected: u64, now_ms: u64) -> SaveOutcome {
        match self.expect(key, expected, now_ms) {
            Ok(i) => {
                self.remove_slot(i);
                SaveOutcome::Saved
            }
            Err(outcome) => outcome,
        }
    }

    pub(super) fn delete(&mut self, key: &Key) {
        if let Some(&i) = self.map.get(key) {
            self.remove_slot(i);
        }
    }

    /// A use of a session: the first one after its creation moves it from probation to the
    /// tail of protected; any later one sets its bit.
    fn mark_used(&mut self, i: u32) {
        if self.slots[i as usize].queue == Queue::Probation {
            self.unlink(i);
            self.push_back(Queue::Protected, i);
        } else {
            self.slots[i as usize].used = true;
        }
    }

    /// Removes every expired session; answers how many.
    pub(super) fn sweep(&mut self, now_ms: u64) -> usize {
        let mut removed = 0;
        // The builder keeps a shard's sessions, hence its slots, below `NIL`.
        for i in 0..u32::try_from(self.slots.len()).unwrap_or(NIL) {
            let slot = &self.slots[i as usize];
            if slot.queue != Queue::Free && !slot.live(now_ms) {
                self.remove_slot(i);
                removed += 1;
            }
        }
        removed
    }

    /// Evicts until `bytes` more bytes and `sessions` more sessions fit, never evicting the
    /// slot `keep` (the one being saved). The caller has checked that they fit an empty shard.
    fn make_room(&mut self, bytes: usize, sessions: usize, keep: u32, now_ms: u64) {
        let over = |s: &Self| {
            s.bytes + bytes > s.limits.bytes || s.map.len() + sessions > s.limits.sessions
        };
        if !over(self) {
            return;
        }
        self.sweep_some(keep, now_ms);
        let mut passes = 0;
        while over(self) {
            let probation = self.lists[Queue::Probation as usize];
            let protected = self.lists[Queue::Protected as usize];
            let mut queue = if probation.len > 0
                && (protected.len == 0
                    || probation.len * 10 >= self.map.len()
                    || probation.bytes * 10 >= self.bytes)
            {
                Queue::Probation
            } else {
                Queue::Protected
            };
            // The slot being saved alone in its queue: the other queue holds what must go.
            if self.lists[queue as usize].head == keep && self.lists[queue as usize].len == 1 {
                queue = match queue {
                    Queue::Probation => Queue::Protected,
                    _ => Queue::Probation,
                };
            }
            let i = self.lists[queue as usize].head;
            #[cfg(test)]
            {
                self.steps += 1;
            }
            let slot = &mut self.slots[i as usize];
            if i != keep && !slot.live(now_ms) {
                self.remove_slot(i);
            } else if i == keep || (slot.used && passes < MAX_PASSES) {
                // A second chance: used since it was last passed over (or being saved).
                slot.used = false;
                passes += 1;
                self.unlink(i);
                self.push_back(Queue::Protected, i);
            } else {
                self.remove_slot(i);
                self.evictions += 1;
            }
        }
    }

    /// The next [`SWEEP_STEP`] slots of a sweep that goes round the slab: expired sessions
    /// there go before eviction takes a live one.
    fn sweep_some(&mut self, keep: u32, now_ms: u64) {
        let n = u32::try_from(self.slots.len()).unwrap_or(NIL);
        for _ in 0..SWEEP_STEP.min(n) {
            if self.cursor >= n {
                self.cursor = 0;
            }
            let i = self.cursor;
            self.cursor += 1;
            #[cfg(test)]
            {
                self.steps += 1;
            }
            let slot = &self.slots[i as usize];
            if i != keep && slot.queue != Queue::Free && !slot.live(now_ms) {
                self.remove_slot(i);
            }
        }
    }

    fn remove_slot(&mut self, i: u32) {
        self.unlink(i);
        self.unindex_owner(i);
        let slot = &mut self.slots[i as usize];
        self.bytes -= slot.cost();
        self.map.remove(&slot.key);
        slot.data = Bytes::new();
        slot.owner = None;
        slot.queue = Queue::Free;
        slot.next = self.free;
        self.free = i;
    }

    fn unlink(&mut self, i: u32) {
        let cost = self.slots[i as usize].cost();
        let Slot {
            prev, next, queue, ..
        } = self.slots[i as usize];
        let list = &mut self.lists[queue as usize];
        list.len -= 1;
        list.bytes -= cost;
        if prev == NIL {
            list.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            list.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }

    fn push_back(&mut self, queue: Queue, i: u32) {
        let list = &mut self.lists[queue as usize];
        let tail = list.tail;
        list.tail = i;
        if tail == NIL {
            list.head = i;
        }
        list.len += 1;
        let slot = &mut self.slots[i as usize];
        list.bytes += slot.cost();
        slot.queue = queue;
        slot.prev = tail;
        slot.next = NIL;
        if tail != NIL {
            self.slots[tail as usize].next = i;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;
    const LATER: u64 = NOW + 3_600_000;

    fn record(len: usize, expires_ms: u64) -> Record {
        Record::from_unix_ms(Key::random(), Bytes::from(vec![b'x'; len]), 1, expires_ms)
    }

    fn shard(sessions: usize, bytes: usize) -> Shard {
        Shard::new(Limits { sessions, bytes })
    }

    impl Shard {
        /// Walks both queues and the slab: every session is in exactly one queue, the counts
        /// and byte totals agree, and the bounds hold.
        fn check(&self) {
            let mut seen = 0;
            let mut total = 0;
            for (q, list) in self.lists.iter().enumerate() {
                let (mut len, mut bytes, mut prev, mut i) = (0, 0, NIL, list.head);
                while i != NIL {
                    let slot = &self.slots[i as usize];
                    assert_eq!(slot.queue as usize, q);
                    assert_eq!(slot.prev, prev);
                    assert_eq!(self.map[&slot.key], i);
                    len += 1;
                    bytes += slot.cost();
                    prev = i;
                    i = slot.next;
                }
                assert_eq!(list.tail, prev);
                assert_eq!((list.len, list.bytes), (len, bytes));
                seen += len;
                total += bytes;
            }
            assert_eq!(seen, self.map.len());
            assert_eq!(total, self.bytes);
            assert!(self.bytes <= self.limits.bytes, "over the byte bound");
            assert!(
                self.map.len() <= self.limits.sessions,
                "over the session bound"
            );
            // The owner index holds exactly the owned sessions, each once.
            let indexed: usize = self.owners.values().map(Vec::len).sum();
            let owned = self
                .map
                .values()
                .filter(|&&i| self.slots[i as usize].owner.is_some());
            assert_eq!(indexed, owned.count());
            for (owner, slots) in &self.owners {
                assert!(!slots.is_empty());
                for &i in slots {
                    assert_eq!(self.slots[i as usize].owner.as_ref(), Some(owner));
                    assert_eq!(self.map[&self.slots[i as usize].key], i);
                }
            }
        }

        fn contains(&self, r: &Record) -> bool {
            self.map.contains_key(&r.key())
        }
    }

    #[test]
    fn a_slot_is_96_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 96);
    }

    fn owned_by(s: &Shard, owner: &str, now_ms: u64) -> Vec<Key> {
        let mut out = Vec::new();
        s.owned(owner, now_ms, &mut out);
        let mut keys: Vec<Key> = out.iter().map(Record::key).collect();
        keys.sort();
        keys
    }

    #[test]
    fn the_owner_index_follows_creates_saves_removals_and_evictions() {
        let mut s = shard(4, usize::MAX);
        let owner: Arc<str> = Arc::from("42");
        let mine: Vec<Record> = (0..3)
            .map(|_| record(10, LATER).with_owner(Some(owner.clone())))
            .collect();
        for r in &mine {
            s.create(r, NOW).unwrap();
        }
        s.check();
        let mut keys: Vec<Key> = mine.iter().map(Record::key).collect();
        keys.sort();
        assert_eq!(owned_by(&s, "42", NOW), keys);
        assert!(owned_by(&s, "4", NOW).is_empty());
        // Saved with another owner: listed under that one only.
        let moved = Record::from_unix_ms(mine[0].key(), Bytes::from_static(b"y"), 2, LATER)
            .with_owner(Some(Arc::from("7")));
        assert_eq!(s.save(&moved, 1, NOW).unwrap(), SaveOutcome::Saved);
        s.check();
        assert_eq!(owned_by(&s, "42", NOW).len(), 2);
        assert_eq!(owned_by(&s, "7", NOW), vec![mine[0].key()]);
        // A touch keeps the owner; a removal and a delete drop it.
        assert_eq!(
            s.touch(&mine[1].key(), 1, LATER + 1, NOW),
            SaveOutcome::Saved
        );
        assert_eq!(s.load(&mine[1].key(), NOW).unwrap().owner(), Some("42"));
        assert_eq!(s.remove(&mine[1].key(), 1, NOW), SaveOutcome::Saved);
        s.delete(&mine[0].key());
        s.check();
        assert_eq!(owned_by(&s, "42", NOW), vec![mine[2].key()]);
        assert!(owned_by(&s, "7", NOW).is_empty());
        // Expired: not listed, and gone from the index once swept or evicted.
        assert!(owned_by(&s, "42", LATER).is_empty());
        for _ in 0..4 {
            s.create(&record(10, LATER + 10), LATER).unwrap();
        }
        s.check();
        assert!(s.owners.is_empty());
    }

    /// The worst case for a second-chance eviction: every session in the shard used since the
    /// last pass. The work per create at the bound stays the same whatever the shard's size.
    #[test]
    fn eviction_work_does_not_grow_with_the_shard() {
        for size in [1_000, 100_000] {
            let mut s = shard(size, usize::MAX);
            let old: Vec<Record> = (0..size).map(|_| record(10, LATER)).collect();
            for r in &old {
                s.create(r, NOW).unwrap();
            }
            // The first use moves a session to protected, the second sets its bit.
            for _ in 0..2 {
                for r in &old {
                    s.load(&r.key(), NOW).unwrap();
                }
            }
            let mut worst = 0;
            for _ in 0..2_000 {
                let before = s.steps;
                s.create(&record(10, LATER), NOW).unwrap();
                worst = worst.max(s.steps - before);
            }
            assert!(
                worst <= MAX_PASSES as u64 + 1 + u64::from(SWEEP_STEP),
                "{size} sessions: {worst} steps for one create"
            );
            s.check();
        }
        // Sessions never used again cost one step each to evict.
        let mut s = shard(1_000, usize::MAX);
        for _ in 0..1_000 {
            s.create(&record(10, LATER), NOW).unwrap();
        }
        let before = s.steps;
        for _ in 0..1_000 {
            s.create(&record(10, LATER), NOW).unwrap();
        }
        assert_eq!(s.steps - before, 1_000 * (1 + u64::from(SWEEP_STEP)));
        assert_eq!(s.evictions(), 1_000);
    }

    /// Sessions that came back are kept through any number of new sessions that do not.
    #[test]
    fn a_flood_of_new_sessions_evicts_only_its_own_kind() {
        let mut s = shard(100, usize::MAX);
        let users: Vec<Record> = (0..50).map(|_| record(100, LATER)).collect();
        for r in &users {
            s.create(r, NOW).unwrap();
            s.load(&r.key(), NOW).unwrap();
        }
        for _ in 0..10_000 {
            s.create(&record(10, LATER), NOW).unwrap();
        }
        assert!(users.iter().all(|r| s.contains(r)));
        assert_eq!(s.len(), 100);
        s.check();
    }

    /// Expired sessions go before live ones: those the round of the sweep meets, and those at
    /// the head of a queue, whatever their use.
    #[test]
    fn expired_sessions_go_first() {
        // Never used again, interleaved with expired ones: the round of the sweep finds them.
        let mut s = shard(8, usize::MAX);
        let mut live = Vec::new();
        let mut expired = Vec::new();
        for _ in 0..4 {
            let l = record(10, LATER);
            let e = record(10, NOW + 10);
            s.create(&l, NOW).unwrap();
            s.create(&e, NOW).unwrap();
            live.push(l);
            expired.push(e);
        }
        for _ in 0..4 {
            s.create(&record(10, LATER), NOW + 10).unwrap();
        }
        assert!(live.iter().all(|r| s.contains(r)));
        assert!(!expired.iter().any(|r| s.contains(r)));
        assert_eq!(s.evictions(), 0, "removing expired sessions is no eviction");
        s.check();

        // A shard larger than the sweep's step, every session used twice (so each would get
        // a second chance), the expired ones at the head of protected.
        let mut s = shard(100, usize::MAX);
        let expired: Vec<Record> = (0..50).map(|_| record(10, NOW + 10)).collect();
        let live: Vec<Record> = (0..50).map(|_| record(10, LATER)).collect();
        for r in expired.iter().chain(&live) {
            s.create(r, NOW).unwrap();
        }
        for _ in 0..2 {
            for r in expired.iter().chain(&live) {
                s.load(&r.key(), NOW).unwrap();
            }
        }
        for _ in 0..50 {
            s.create(&record(10, LATER), NOW + 10).unwrap();
        }
        assert!(live.iter().all(|r| s.contains(r)));
        assert!(!expired.iter().any(|r| s.contains(r)));
        assert_eq!(s.evictions(), 0);
        s.check();
    }

    /// A save that makes its session larger evicts others, never itself.
    #[test]
    fn a_growing_save_makes_room_around_itself() {
        let limit = 10 * cost(100);
        let mut s = shard(100, limit);
        let me = record(100, LATER);
        s.create(&me, NOW).unwrap();
        for _ in 0..9 {
            s.create(&record(100, LATER), NOW).unwrap();
        }
        let big = Record::from_unix_ms(me.key(), Bytes::from(vec![b'y'; 5 * cost(100)]), 2, LATER);
        assert_eq!(s.save(&big, 1, NOW).unwrap(), SaveOutcome::Saved);
        assert!(s.contains(&me));
        assert!(s.len() < 10);
        s.check();
        // Larger than the whole shard: refused, nothing changed.
        let huge = Record::from_unix_ms(me.key(), Bytes::from(vec![b'z'; limit]), 3, LATER);
        assert!(s.save(&huge, 2, NOW).unwrap_err().is_unavailable());
        assert_eq!(s.load(&me.key(), NOW).unwrap().version(), 2);
        assert!(
            s.create(&record(limit, LATER), NOW)
                .unwrap_err()
                .is_unavailable()
        );
        s.check();
    }

    /// Random operations on a small shard: the queues, the totals and the bounds stay
    /// consistent after every one.
    #[test]
    fn random_operations_keep_the_accounting_exact() {
        let mut s = shard(40, 40 * cost(64));
        let mut ids: Vec<(Key, u64)> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % n as u64).unwrap()
        };
        for step in 0..20_000 {
            let now = NOW + step;
            let pick = if ids.is_empty() { 0 } else { next(ids.len()) };
            match next(7) {
                0 | 1 => {
                    let r = record(next(300), now + 1 + next(2_000) as u64);
                    s.create(&r, now).unwrap();
                    ids.push((r.key(), 1));
                }
                2 if !ids.is_empty() => {
                    let (key, v) = ids[pick];
                    let r = Record::from_unix_ms(
                        key,
                        Bytes::from(vec![b'x'; next(500)]),
                        v + 1,
                        now + 1 + next(2_000) as u64,
                    );
                    if s.save(&r, v, now).unwrap() == SaveOutcome::Saved {
                        ids[pick].1 = v + 1;
                    }
                }
                3 if !ids.is_empty() => {
                    let (key, v) = ids[pick];
                    s.touch(&key, v, now + next(2_000) as u64, now);
                }
                4 if !ids.is_empty() => {
                    let (key, v) = ids[pick];
                    s.remove(&key, v, now);
                }
                5 if !ids.is_empty() => {
                    s.delete(&ids[pick].0);
                }
                6 if step % 100 == 0 => {
                    s.sweep(now);
                }
                _ if !ids.is_empty() => {
                    s.load(&ids[pick].0, now);
                }
                _ => {}
            }
            s.check();
        }
        assert!(s.evictions() > 0);
    }
}
