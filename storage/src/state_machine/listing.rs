//! Listings in pages: the keys under a prefix as they were at one revision,
//! read page after page, each page bounded by a count and by bytes, so a
//! listing of any size reaches a client in messages it can take.
//!
//! A revision older than the current one is rebuilt from the history
//! window: a key changed after it had then the value its first later change
//! replaced. Pages of one listing therefore agree with each other however
//! many writes land between them, as long as the history still reaches back
//! to the listing's revision.

use std::collections::BTreeSet;
use std::ops::Bound;

use super::state::State;
use crate::kv::KeyValue;

/// What a page may hold.
#[derive(Debug, Clone, Copy)]
pub struct PageLimits {
    /// At most this many keys (0: no count limit).
    pub keys: usize,
    /// Keys and values of at most about this many bytes: a page stops after
    /// the key that reaches it, so one key always fits.
    pub bytes: usize,
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The keys, in key order, as they were at `revision`.
    pub kvs: Vec<KeyValue>,
    /// More keys follow: ask again after the last key of this page.
    pub more: bool,
    /// The revision the page was read at.
    pub revision: u64,
    /// Bytes of keys and values in `kvs`.
    pub bytes: usize,
}

/// Why a page cannot be read at the revision asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageError {
    /// The history no longer reaches back to it: changes at or before this
    /// revision are gone.
    Compacted(u64),
    /// It is after the newest revision, which is this one.
    Future(u64),
}

/// The keys under `prefix` after `after` (exclusive; empty: from the
/// first), as they were at `revision` (0: now).
pub(crate) fn page(
    state: &State,
    prefix: &str,
    after: &str,
    revision: u64,
    limits: PageLimits,
) -> Result<Page, PageError> {
    let at = if revision == 0 { state.revision } else { revision };
    if at > state.revision {
        return Err(PageError::Future(state.revision));
    }
    if at < state.compacted() {
        return Err(PageError::Compacted(state.compacted()));
    }
    let lower = if after.is_empty() || after < prefix { Bound::Included(prefix) } else { Bound::Excluded(after) };
    // Keys changed after `at`: their value then is in the history. Deleted
    // ones are no longer in `kv`, so they are candidates of their own.
    let changed: BTreeSet<&str> = if at == state.revision {
        BTreeSet::new()
    } else {
        state
            .events
            .range(at + 1..)
            .map(|(_, change)| change.event.kv.key.as_str())
            .filter(|key| key.starts_with(prefix) && in_lower(key, lower))
            .collect()
    };
    let current = state
        .kv
        .range::<_, str>((lower, Bound::Unbounded))
        .take_while(|(key, _)| key.starts_with(prefix))
        .map(|(key, _)| key.as_str());
    let mut out = Page { revision: at, ..Page::default() };
    for key in merge(current, changed.into_iter()) {
        let Some(kv) = value_at(state, key, at) else { continue };
        let full =
            (limits.keys != 0 && out.kvs.len() == limits.keys) || (!out.kvs.is_empty() && out.bytes >= limits.bytes);
        if full {
            out.more = true;
            break;
        }
        out.bytes += kv.bytes();
        out.kvs.push(kv);
    }
    Ok(out)
}

fn in_lower(key: &str, lower: Bound<&str>) -> bool {
    match lower {
        Bound::Included(b) => key >= b,
        Bound::Excluded(b) => key > b,
        Bound::Unbounded => true,
    }
}

/// Two ascending key sequences as one, without duplicates.
fn merge<'a>(a: impl Iterator<Item = &'a str>, b: impl Iterator<Item = &'a str>) -> impl Iterator<Item = &'a str> {
    let mut a = a.peekable();
    let mut b = b.peekable();
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if x == y => {
            b.next();
            a.next()
        }
        (Some(x), Some(y)) if x < y => a.next(),
        (Some(_), Some(_)) => b.next(),
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}

/// `key` as it was at `at` (a revision the history reaches back to).
fn value_at(state: &State, key: &str, at: u64) -> Option<KeyValue> {
    let later = (key.to_owned(), at + 1)..=(key.to_owned(), u64::MAX);
    match state.history.range(later).next() {
        Some((_, rev)) => state.events.get(rev).and_then(|c| c.prev.clone()).map(|v| v.with_key(key.to_owned())),
        None => state.kv.get(key).map(|v| v.clone().with_key(key.to_owned())),
    }
}
