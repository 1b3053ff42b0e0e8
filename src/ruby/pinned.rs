//! Response body Strings handed to the socket without a copy.
//!
//! Copying a large String body costs the Ruby thread time under the GVL and
//! a fresh allocation per request (for 1 MiB: an mmap, 256 page faults and
//! the memcpy, seen in perf on body_1m.ru). Instead, a chunk of `PIN_AT`
//! bytes or more is given to hyper as a `Bytes` over the String's own
//! buffer:
//!
//! - the bytes come from `rb_str_new_frozen`: a frozen String that shares
//!   the chunk's buffer (O(1)); should the app modify its own String later,
//!   Ruby copies it first (copy-on-write), so what we send never changes;
//! - the frozen String is kept alive and unmoved while hyper holds the
//!   bytes: it sits in a registry that a marker object marks (`rb_gc_mark`
//!   pins), and leaves it when hyper drops the `Bytes`, on whatever thread.
//!   The registry is a plain mutex-guarded slab; no Ruby API is called
//!   while its lock is held, so the GC's marking can never wait on itself.
//!
//! A process forked from one that serves (an app that forks in a request)
//! starts with a fresh registry: the old one's lock may be held by a thread
//! that does not exist there, and nothing in the child writes those bytes.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use magnus::gc::Marker;
use magnus::rb_sys::{AsRawValue, FromRawValue};
use magnus::{prelude::*, DataTypeFunctions, Error, RModule, RString, Ruby, TypedData, Value};

/// Chunks smaller than this are copied: pinning costs more than copying them.
pub(crate) const PIN_AT: usize = 16 * 1024;

/// Frozen Strings whose bytes hyper holds. A slot of 0 is free (0 is
/// `false`, never a String).
struct Registry {
    owner: u32,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    values: Vec<rb_sys::VALUE>,
    free: Vec<usize>,
}

static REGISTRY: AtomicPtr<Registry> = AtomicPtr::new(std::ptr::null_mut());

/// This process's registry, made on first use in each process. Registries
/// are never freed: a `Pinned` may outlive a fork, and a leaked old one is
/// what a forked child must keep.
fn registry() -> &'static Registry {
    let pid = crate::fork_safe::current_pid();
    let current = REGISTRY.load(Ordering::Acquire);
    // SAFETY: a non-null pointer here came from Box::into_raw below and is
    // never freed.
    if let Some(registry) = unsafe { current.as_ref() } {
        if registry.owner == pid {
            return registry;
        }
    }
    let fresh = Box::into_raw(Box::new(Registry {
        owner: pid,
        slots: Mutex::new(Slots::default()),
    }));
    match REGISTRY.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: just leaked above, never freed.
        Ok(_) => unsafe { &*fresh },
        Err(winner) => {
            // SAFETY: `fresh` was never shared; `winner` is a leaked
            // registry another thread of this process installed.
            unsafe {
                drop(Box::from_raw(fresh));
                &*winner
            }
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pin(&self, value: rb_sys::VALUE) -> usize {
        let mut slots = self.lock();
        match slots.free.pop() {
            Some(index) => {
                slots.values[index] = value;
                index
            }
            None => {
                slots.values.push(value);
                slots.values.len() - 1
            }
        }
    }

    fn unpin(&self, index: usize) {
        let mut slots = self.lock();
        slots.values[index] = 0;
        slots.free.push(index);
    }
}

/// Bytes of a pinned frozen String; unpins it when dropped.
struct Pinned {
    ptr: *const u8,
    len: usize,
    registry: &'static Registry,
    index: usize,
}

// SAFETY: the bytes belong to a frozen String that the registry keeps alive
// and unmoved until `drop`; nothing writes them, so any thread may read them.
unsafe impl Send for Pinned {}

impl AsRef<[u8]> for Pinned {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: see `Send`: `ptr..ptr+len` is the frozen String's buffer,
        // alive and unchanged while this value exists.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.registry.unpin(self.index);
    }
}

/// A body chunk as `Bytes`: copied when small, otherwise pinned (see the
/// module docs). Called with the GVL held.
pub(crate) fn body_chunk(text: RString) -> Result<Bytes, Error> {
    if text.len() < PIN_AT {
        // SAFETY: copied out before any Ruby code runs.
        return Ok(Bytes::copy_from_slice(unsafe { text.as_slice() }));
    }
    let frozen = magnus::rb_sys::protect(|| {
        // SAFETY: with the GVL held, on a live String; may allocate (and
        // raise NoMemoryError, caught by rb_protect).
        unsafe { rb_sys::rb_str_new_frozen(text.as_raw()) }
    })?;
    // SAFETY: a live String VALUE on this stack.
    let frozen = RString::from_value(unsafe { Value::from_raw(frozen) })
        .expect("rb_str_new_frozen returns a String");
    // SAFETY: the slice's pointer and length are read before any Ruby code
    // runs; the buffer stays put while the String is pinned below.
    let (ptr, len) = unsafe {
        let bytes = frozen.as_slice();
        (bytes.as_ptr(), bytes.len())
    };
    let registry = registry();
    let index = registry.pin(frozen.as_raw());
    Ok(Bytes::from_owner(Pinned {
        ptr,
        len,
        registry,
        index,
    }))
}

/// The object whose marking keeps pinned Strings alive (one per process,
/// registered as permanently live).
#[derive(TypedData)]
#[magnus(class = "Hyperion::PinnedStrings", free_immediately, mark)]
struct PinnedStrings;

impl DataTypeFunctions for PinnedStrings {
    fn mark(&self, marker: &Marker) {
        let slots = registry().lock();
        for &value in slots.values.iter().filter(|&&v| v != 0) {
            // SAFETY: a live, pinned String VALUE (see the module docs).
            marker.mark(unsafe { Value::from_raw(value) });
        }
    }
}

pub(crate) fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let class = module.define_class("PinnedStrings", ruby.class_object())?;
    class.undef_default_alloc_func();
    let marker = ruby.obj_wrap(PinnedStrings);
    magnus::gc::register_mark_object(marker);
    Ok(())
}
