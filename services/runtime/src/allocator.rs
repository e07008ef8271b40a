//! Process-wide allocator settings, applied once at startup by the binary.
//!
//! A forward pass allocates and frees activation buffers of hundreds of KiB to a few MiB many
//! times per step. With glibc's defaults, freeing them shrinks the heap (trim) or unmaps them,
//! so the next step page-faults the same memory back in, zero-filled by the kernel: measured on
//! the tiny model's 256-token prefill (2 threads), 10 % of the process's CPU time was kernel
//! time and prefill ran 8–11 % slower than with the settings below. Keeping freed memory mapped
//! costs at most the peak of one step's buffers, which the process needs again on the next one.

/// Allocations below this come from the heap, never `mmap` (glibc's largest accepted value):
/// fixing it also stops glibc's dynamic threshold from moving.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of a heap is returned to the kernel only beyond this.
const TRIM_THRESHOLD: i32 = 256 << 20;

/// Applies the settings above; an error names the setting the C library refused.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune() -> Result<(), String> {
    for (name, param, value) in [
        ("M_MMAP_THRESHOLD", libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("M_TRIM_THRESHOLD", libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ] {
        // SAFETY: mallopt only updates the allocator's parameters; it is called before any
        // thread of ours is started (and glibc takes its own lock anyway).
        if unsafe { libc::mallopt(param, value) } != 1 {
            return Err(format!("mallopt({name}, {value}) refused"));
        }
    }
    Ok(())
}

/// Other C libraries: their allocators keep their own defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() -> Result<(), String> {
    Ok(())
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    #[test]
    fn glibc_accepts_the_settings() {
        // mallopt rejects an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2); this fails if the
        // constants drift out of the accepted range.
        assert_eq!(super::tune(), Ok(()));
    }
}
