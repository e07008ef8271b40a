//! Top-k selection that picks the same elements as PyTorch's CPU `topk`, ties included.
//!
//! Why: the Lightning Indexer's scores are sums of `w_h · ReLU(q_h · k_j)` over FP4-rounded
//! vectors, so exact ties are common (every entry whose dot products are all negative scores
//! exactly 0). Which tied entries make the top-k changes the attention set. The reference
//! (`torch.topk` on CPU) runs libstdc++'s `std::nth_element` on `(value, index)` pairs, or
//! `std::partial_sort` when `k·64 ≤ n`, with the comparator `a.value > b.value`; this module
//! replays those algorithms step for step so the chosen sets agree with the reference instead
//! of merely being valid. (Checked against libstdc++ itself: `tests/topk_libstdcxx.rs`.)

type Elem = (f32, usize);

#[inline]
fn comp(a: &Elem, b: &Elem) -> bool {
    a.0 > b.0
}

/// Indices of the `k` largest values (a set; returned in ascending index order).
pub fn torch_topk(values: &[f32], k: usize) -> Vec<usize> {
    let n = values.len();
    if k >= n {
        return (0..n).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let mut q: Vec<Elem> = values.iter().copied().zip(0..).collect();
    if k * 64 <= n {
        heap_select(&mut q, k);
    } else {
        nth_element(&mut q, k - 1);
    }
    let mut picked: Vec<usize> = q[..k].iter().map(|e| e.1).collect();
    picked.sort_unstable();
    picked
}

/// libstdc++ `std::nth_element` (introselect).
fn nth_element(v: &mut [Elem], nth: usize) {
    let depth = 2 * (usize::BITS - 1 - v.len().leading_zeros()) as usize;
    introselect(v, 0, nth, v.len(), depth);
}

fn introselect(v: &mut [Elem], mut first: usize, nth: usize, mut last: usize, mut depth: usize) {
    while last - first > 3 {
        if depth == 0 {
            heap_select_range(v, first, nth + 1, last);
            v.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot(v, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(v, first, last);
}

fn unguarded_partition_pivot(v: &mut [Elem], first: usize, last: usize) -> usize {
    let mid = first + (last - first) / 2;
    move_median_to_first(v, first, first + 1, mid, last - 1);
    unguarded_partition(v, first + 1, last, first)
}

fn move_median_to_first(v: &mut [Elem], result: usize, a: usize, b: usize, c: usize) {
    let pick = if comp(&v[a], &v[b]) {
        if comp(&v[b], &v[c]) {
            b
        } else if comp(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if comp(&v[a], &v[c]) {
        a
    } else if comp(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(result, pick);
}

fn unguarded_partition(v: &mut [Elem], mut first: usize, mut last: usize, pivot: usize) -> usize {
    loop {
        while comp(&v[first], &v[pivot]) {
            first += 1;
        }
        last -= 1;
        while comp(&v[pivot], &v[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        v.swap(first, last);
        first += 1;
    }
}

fn insertion_sort(v: &mut [Elem], first: usize, last: usize) {
    if first == last {
        return;
    }
    for i in first + 1..last {
        let val = v[i];
        if comp(&val, &v[first]) {
            v.copy_within(first..i, first + 1);
            v[first] = val;
        } else {
            let mut hole = i;
            while comp(&val, &v[hole - 1]) {
                v[hole] = v[hole - 1];
                hole -= 1;
            }
            v[hole] = val;
        }
    }
}

/// The selection half of libstdc++ `std::partial_sort` (the final `sort_heap` only orders the
/// chosen elements).
fn heap_select(v: &mut [Elem], k: usize) {
    let n = v.len();
    heap_select_range(v, 0, k, n);
}

fn heap_select_range(v: &mut [Elem], first: usize, middle: usize, last: usize) {
    make_heap(v, first, middle);
    for i in middle..last {
        if comp(&v[i], &v[first]) {
            // __pop_heap(first, middle, i): the new element takes the root's place.
            let value = v[i];
            v[i] = v[first];
            adjust_heap(v, first, 0, middle - first, value);
        }
    }
}

fn make_heap(v: &mut [Elem], first: usize, last: usize) {
    let len = last - first;
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let value = v[first + parent];
        adjust_heap(v, first, parent, len, value);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

fn adjust_heap(v: &mut [Elem], first: usize, mut hole: usize, len: usize, value: Elem) {
    let top = hole;
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if comp(&v[first + child], &v[first + child - 1]) {
            child -= 1;
        }
        v[first + hole] = v[first + child];
        hole = child;
    }
    if len.is_multiple_of(2) && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        v[first + hole] = v[first + child - 1];
        hole = child - 1;
    }
    // __push_heap
    let mut parent = hole.wrapping_sub(1) / 2;
    while hole > top && comp(&v[first + parent], &value) {
        v[first + hole] = v[first + parent];
        hole = parent;
        parent = hole.wrapping_sub(1) / 2;
    }
    v[first + hole] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without ties the selection is simply the k largest.
    #[test]
    fn distinct_values_give_the_k_largest() {
        for n in [5usize, 17, 70, 300, 2000] {
            let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % n) as f32 * 0.5 - 3.0).collect();
            for k in [1, 2, 4, 16, n - 1] {
                let mut want: Vec<usize> = (0..n).collect();
                want.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
                want.truncate(k);
                want.sort_unstable();
                assert_eq!(torch_topk(&values, k), want, "n={n} k={k}");
            }
        }
    }
}
