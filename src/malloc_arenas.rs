//! glibc malloc: one arena for the whole process, unless the user chose a
//! count with `MALLOC_ARENA_MAX` or the `glibc.malloc.arena_max` tunable.
//!
//! glibc gives each new thread its own arena (up to 8 per core) and gives an
//! arena's free memory back to the kernel only from the top of its heap.
//! Ruby frees a request's body String when its GC sweeps, tens of MB later,
//! so every app thread's arena grows to the most dead bodies it ever held
//! and keeps that memory; a worker's RSS is the sum of those peaks and
//! creeps up as one arena reaches a new one (`bench/soak`, 64 KiB uploads,
//! two workers: 218 MB and +15% after a 400,000-request warm-up; with one
//! arena 149 MB and flat). Ruby threads allocate one at a time under the
//! GVL, so their own arenas buy them no concurrency.
//!
//! Threads that already have an arena keep it; the limit must therefore be
//! set before the server starts its threads (`Worker.new` does it).

use std::ffi::OsStr;

/// True when the environment already chose the arena count: glibc read it
/// at startup and Hyperion leaves it alone.
pub fn user_chose_arenas(malloc_arena_max: Option<&OsStr>, glibc_tunables: Option<&OsStr>) -> bool {
    malloc_arena_max.is_some()
        || glibc_tunables.is_some_and(|t| {
            t.to_string_lossy()
                .split([':', ','])
                .any(|setting| setting.starts_with("glibc.malloc.arena_max="))
        })
}

/// Limits glibc malloc to one arena, once per process, unless the
/// environment chose a count. Elsewhere than glibc it does nothing.
pub fn limit_to_one_arena() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let chosen = user_chose_arenas(
            std::env::var_os("MALLOC_ARENA_MAX").as_deref(),
            std::env::var_os("GLIBC_TUNABLES").as_deref(),
        );
        if !chosen {
            set_one_arena();
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_one_arena() {
    // SAFETY: mallopt only records a malloc parameter (under glibc's own
    // lock); it takes no pointers and any thread may call it at any time.
    unsafe { nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_one_arena() {}

#[cfg(test)]
mod tests {
    use super::*;

    fn chose(max: Option<&str>, tunables: Option<&str>) -> bool {
        user_chose_arenas(max.map(OsStr::new), tunables.map(OsStr::new))
    }

    #[test]
    fn an_arena_count_in_the_environment_wins() {
        assert!(!chose(None, None));
        assert!(chose(Some("4"), None));
        assert!(chose(Some(""), None));
        assert!(chose(None, Some("glibc.malloc.arena_max=2")));
        assert!(chose(
            None,
            Some("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=8")
        ));
        // Other tunables leave the choice to Hyperion.
        assert!(!chose(
            None,
            Some("glibc.malloc.arena_test=2:glibc.malloc.mmap_threshold=131072")
        ));
    }
}
