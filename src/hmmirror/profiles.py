"""Kernel profiles: every per-version behaviour of the substrate and the HMM layer lives here, as data.

Model code never tests a version string; it reads a named field of :class:`KernelProfile` (e.g.
``profile.devmap_bits``).  Adding a version means adding a profile.
"""

from __future__ import annotations

from dataclasses import dataclass

from hmmirror.errors import InputError


@dataclass(frozen=True)
class KernelProfile:
    """What differs between the kernels hmmirror models (mm-substrate.md era tags)."""

    name: str
    hmm_module: str                     # module implementing the HMM API of this version
    devmap_bits: bool                   # DAX entries carry _PAGE_DEVMAP (PTE: SPECIAL|DEVMAP) [5.2 .. 6.16]
    dax_refcounted: bool                # mapping a DAX frame takes refcount/mapcount [6.18]
    mprotect_keeps_exclusive_writable: bool   # mprotect(RW) makes exclusive anon entries writable [6.18, obs A10]
    thp_cow_split: bool                 # write to a shared anon THP: split + copy 4K [6.18]; False: copy 2 MiB [5.2]
    file_pmd_mappings: bool             # ext4/xfs page cache PMD-mapped with MADV_HUGEPAGE [6.18, obs D12]
    hugetlb_dontneed: bool              # MADV_DONTNEED allowed on hugetlb VMAs [6.18]
    mprotect_chunk_shift: int           # PROTECTION_VMA chunking: PUD (30) [5.2] or P4D (39) [6.18]
    notifier_events: int                # number of mmu_notifier_event values (5 [5.2], 8 [6.18])
    pte_markers: bool                   # guard / uffd-wp / poison markers exist [6.18]
    huge_zero_per_mm: bool              # huge zero folio referenced per mm [5.2]
    interval_notifiers: bool            # mmu_interval_notifier exists [5.5+]
    pagemap_exclusive_per_folio: bool   # pagemap "exclusive" of a large folio: !folio_maybe_mapped_shared [6.18 with
                                        # CONFIG_NO_PAGE_MAPCOUNT]; False: the page's precise mapcount is 1
    file_large_folios: bool             # ext4/xfs page cache in large folios, fault-around maps whole folios [6.18]
    mprotect_pud_leaf: bool             # mprotect changes/splits PUD leaves [6.18]; [5.2] clears them as bad (rejected)
    madvise_advice: tuple[str, ...]     # advice names madvise_behavior_valid() accepts; others -EINVAL
    fork_copies_shared_hugetlb: bool    # fork copies shared hugetlb page tables [5.2]; lazy since 6.0 (bcd51a3c679d)
    exit_mmap_takes_mmap_lock: bool     # exit_mmap takes mmap_lock (read: unmap, write: free_pgtables) [6.18]
    oom_reap_skips_locked: bool         # OOM reaper skips VM_LOCKED VMAs (can_madv_dontneed_vma) [5.2]
    swapin_exclusive_writable: bool     # do_swap_page maps an exclusive page writable on a read fault [6.x]
    wp_huge_split_on_fallback: bool     # file write fault on a huge PMD/PUD: huge_fault only for shared VMAs, split
                                        # on FALLBACK [5.8+]; [5.2] returns huge_fault's result (DAX splits itself)
    pgmap_owner_required: bool          # device-private dev_pagemaps must carry a non-NULL owner [5.7+]
    pagemap_pmd_exclusive_head: bool    # pagemap of a PMD leaf: "exclusive" from the head page's mapcount for all 512
                                        # entries [5.2, 6.18]; from each subpage's own mapcount [6.12]
    # --- device memory (issue 11) ---------------------------------------------------------------------------
    device_private_free_at_zero: bool   # device-private pages are free at refcount 0; zone_device_page_init() sets 1
                                        # and takes a pgmap ref, the last put calls page_free [6.0+]; [5.2] idle at 1
    do_swap_page_device_lock: bool      # do_swap_page() trylocks the device-private page before migrate_to_ram and
                                        # migrate_vma_*() leave fault_page locked by the caller [6.15+]; [6.12] it only
                                        # takes a reference and migrate_vma_collect_pmd() trylocks it like any page
    make_device_exclusive_single: bool  # make_device_exclusive(mm, addr, owner, &folio): one page, locked folio, the
                                        # exclusive entry keeps its rmap [6.15+]; [6.12] make_device_exclusive_range()
                                        # over an rmap walk, the entry drops the rmap (mapcount) but keeps the reference
    dmirror_release_evicts: bool        # lib/test_hmm.c dmirror_fops_release() migrates the device's pages back to RAM
                                        # (6.12.y stable, 2026 tree); mainline 6.15-6.18 only removes the notifier
    dmirror_flags_ioctl: bool           # lib/test_hmm.c has HMM_DMIRROR_FLAGS (HMM_DMIRROR_FLAG_FAIL_ALLOC) [6.19+,
                                        # with device-private THP]; without it the ioctl is -EINVAL
    large_folio_fs: tuple[str, ...]     # disk filesystems whose buffered writes create large page-cache folios
                                        # (ext4 since 6.16, xfs since 5.18)
    faultaround_maps_folio: bool        # filemap_map_folio_range maps a whole large folio (inside VMA and PTE table)
                                        # [6.18, 357b92761d94]; else only the fault-around window
    finish_fault_folio: str             # whose faults finish_fault maps a whole large folio for (all its PTEs none):
                                        # "none" [5.2], "anon_shmem" [6.12], "all" [6.18, 19773df031bc]
    map_large_below_eof: bool           # no PMD / whole-folio mapping of a folio reaching EOF on a non-shmem file
                                        # (74207de2ba10, "do not populate page table entries beyond i_size")
    truncate_partial_folio: str         # a large folio the new EOF cuts: "keep" [5.2: zeroed, stays whole and
                                        # mapped]; "split" [6.12: split_folio() to order 0]; "split_nonuniform"
                                        # [6.18: try_folio_split_to_order() at the EOF page]; splitting a file folio
                                        # unmaps all of it (unmap_folio, remap_page skips file folios)
    thp_split_zero_subpages: bool       # splitting an anonymous THP maps its zero-filled subpages to the shared zero
                                        # page (remap_page(RMP_USE_SHARED_ZEROPAGE), 6.12+); model: in MADV_PAGEOUT
    collapse_needs_writable: bool       # khugepaged/MADV_COLLAPSE refuse a block without a writable PTE (SCAN_PAGE_RO)
                                        # [6.12]; the check is gone in 6.18 (a block of zero-page PTEs collapses)
    collapse_pmd_null_continues: bool   # MADV_COLLAPSE goes on past a block without a page table (SCAN_PMD_NULL
                                        # whitelisted) [6.12 source]; 6.18.44 stops there with -EINVAL (measured)
    dmirror_tail_pgmap_aliases_head: bool = False   # lib/test_hmm.c dmirror_mkentry() on a tail page of a compound
                                        # device-dax folio reads page->pgmap, which shares its word with
                                        # compound_head: pgmap = head + 1, pgmap->type = _folio_nr_pages >> 8
                                        # (2 = DEVICE_COHERENT for 2 MiB folios) -> DEV_COHERENT_REMOTE [6.12];
                                        # fixed by page_pgmap() (folio->pgmap) [6.15+]
    huge_zero_wp_new_thp: bool = True   # do_huge_pmd_wp_page() on a huge zero PMD allocates a THP for the write
                                        # [5.2: `goto alloc`, while THP is enabled for the VMA; 6.18:
                                        # do_huge_zero_wp_pmd()]; False [6.12]: `goto fallback` splits the PMD
                                        # into zero-page PTEs and do_wp_page() copies the written page only
    faultaround_skips_ra_mark: bool = False  # a cold read fault's mmap read-around (ra_pages 32 around the
                                        # fault) marks PG_readahead on page start + nr - ra_pages/4 and
                                        # next_uptodate_folio() skips it, so fault-around leaves it unmapped
                                        # [6.12, order-0 read-around, guest]; 6.18.44 maps it (host, measured)
    mremap_dontunmap: bool = False      # mremap(MREMAP_DONTUNMAP): move the entries, keep the old VMA mapped and
                                        # empty [5.7+; any VMA but VM_DONTEXPAND/VM_PFNMAP since 5.13]; else -EINVAL
    wp_reuse_large_anon: str = "exclusive_folio"  # write fault on a not-AnonExclusive page of a PTE-mapped
                                        # large anon folio: "page" [5.2 model: reuse when the page is mapped
                                        # once]; "never" [6.12 wp_can_reuse_anon_folio(): large -> copy];
                                        # "exclusive_folio" [6.15+, 1da190f4d0a6: reuse only if > 1 page is
                                        # mapped and every mapping is this mm's (!maybe_mapped_shared)]
    i_mmap_walk_shared: bool = False    # unmap_mapping_pages()/unmap_mapping_folio() walk i_mmap under
                                        # i_mmap_lock_read [6.x]; [5.2] i_mmap_lock_write (mm/memory.c)
    memunmap_put_many: bool = False     # memunmap_pages() drops a non-private pgmap's per-page references with one
                                        # percpu_ref_put_many and never puts the pages (a mapped page holds no pgmap
                                        # reference) [5.17+, 6.12, 6.18]; [5.2] put_page() of every device page, so
                                        # a page still referenced keeps its pgmap reference until its last put


# madvise(2) advice of 5.2 (CONFIG_KSM=n, no MEMORY_FAILURE injection); 6.18 adds COLD/PAGEOUT (5.4),
# POPULATE_READ/WRITE (5.14) and COLLAPSE (6.1).  DONTNEED_LOCKED and GUARD_INSTALL/REMOVE are not modelled.
_MADV_5_2 = ("NORMAL", "RANDOM", "SEQUENTIAL", "WILLNEED", "DONTNEED", "FREE", "REMOVE", "DONTFORK", "DOFORK",
             "HUGEPAGE", "NOHUGEPAGE", "WIPEONFORK", "KEEPONFORK", "DONTDUMP", "DODUMP")


V5_2 = KernelProfile(
    name="5.2",
    hmm_module="hmmirror.mm.hmm.v5_2",
    devmap_bits=True,
    dax_refcounted=False,
    mprotect_keeps_exclusive_writable=False,
    thp_cow_split=False,
    file_pmd_mappings=False,
    hugetlb_dontneed=False,
    mprotect_chunk_shift=30,
    notifier_events=5,
    pte_markers=False,
    huge_zero_per_mm=True,
    interval_notifiers=False,
    file_large_folios=False,
    pagemap_exclusive_per_folio=False,
    mprotect_pud_leaf=False,
    madvise_advice=_MADV_5_2,
    fork_copies_shared_hugetlb=True,
    exit_mmap_takes_mmap_lock=False,
    oom_reap_skips_locked=True,
    swapin_exclusive_writable=False,
    wp_huge_split_on_fallback=False,
    pgmap_owner_required=False,
    pagemap_pmd_exclusive_head=True,
    device_private_free_at_zero=False,
    do_swap_page_device_lock=False,
    make_device_exclusive_single=False,
    dmirror_release_evicts=False,
    dmirror_flags_ioctl=False,
    large_folio_fs=(),
    faultaround_maps_folio=False,
    finish_fault_folio="none",
    map_large_below_eof=False,
    truncate_partial_folio="keep",
    thp_split_zero_subpages=False,
    dmirror_tail_pgmap_aliases_head=False,
    collapse_needs_writable=True,
    collapse_pmd_null_continues=True,
    huge_zero_wp_new_thp=True,              # do_huge_pmd_wp_page(): is_huge_zero_pmd -> goto alloc (THP enabled)
    faultaround_skips_ra_mark=False,        # the spec's §5.5 rule (obs D1); not measured on a 5.2 kernel
    wp_reuse_large_anon="page",
    i_mmap_walk_shared=False,
    memunmap_put_many=False,
)

V6_18 = KernelProfile(
    name="6.18",
    hmm_module="hmmirror.mm.hmm.modern",
    devmap_bits=False,
    dax_refcounted=True,
    mprotect_keeps_exclusive_writable=True,
    thp_cow_split=True,
    file_pmd_mappings=True,
    hugetlb_dontneed=True,
    mprotect_chunk_shift=39,
    notifier_events=8,
    pte_markers=True,
    huge_zero_per_mm=False,
    interval_notifiers=True,
    file_large_folios=True,
    pagemap_exclusive_per_folio=False,      # the host (and Debian) kernels have CONFIG_PAGE_MAPCOUNT=y
    mprotect_pud_leaf=True,
    madvise_advice=_MADV_5_2 + ("COLD", "PAGEOUT", "POPULATE_READ", "POPULATE_WRITE", "COLLAPSE"),
    fork_copies_shared_hugetlb=False,
    exit_mmap_takes_mmap_lock=True,
    oom_reap_skips_locked=False,
    swapin_exclusive_writable=True,
    wp_huge_split_on_fallback=True,
    pgmap_owner_required=True,
    pagemap_pmd_exclusive_head=True,
    device_private_free_at_zero=True,
    do_swap_page_device_lock=True,
    make_device_exclusive_single=True,
    dmirror_release_evicts=False,
    dmirror_flags_ioctl=False,
    large_folio_fs=("ext4", "xfs"),
    faultaround_maps_folio=True,
    finish_fault_folio="all",
    map_large_below_eof=True,
    truncate_partial_folio="split_nonuniform",
    thp_split_zero_subpages=True,
    dmirror_tail_pgmap_aliases_head=False,
    collapse_needs_writable=False,
    collapse_pmd_null_continues=False,
    huge_zero_wp_new_thp=True,
    faultaround_skips_ra_mark=False,        # host 6.18.44: examples/file_faultaround.toml maps pages 16-31
    mremap_dontunmap=True,
    wp_reuse_large_anon="exclusive_folio",
    i_mmap_walk_shared=True,
    memunmap_put_many=True,
)

# Debian 13's LTS kernel (6.12.118 as Debian builds it, read from linux-source-6.12 and checked in the test_hmm
# guest, live/guest/): what differs from 6.18.
V6_12 = KernelProfile(
    name="6.12",
    hmm_module="hmmirror.mm.hmm.modern",
    devmap_bits=True,                       # pte/pmd/pud_devmap until 6.16 (guest: fs-DAX PTE = SPECIAL)
    dax_refcounted=False,                   # fs-DAX pages idle at refcount 1, mappings not counted (6.15+)
    mprotect_keeps_exclusive_writable=True,
    thp_cow_split=True,
    file_pmd_mappings=True,
    hugetlb_dontneed=True,
    mprotect_chunk_shift=39,
    notifier_events=8,
    pte_markers=True,
    huge_zero_per_mm=True,                  # MMF_HUGE_ZERO_PAGE: one huge zero reference per mm
    interval_notifiers=True,
    file_large_folios=True,
    pagemap_exclusive_per_folio=False,      # the host (and Debian) kernels have CONFIG_PAGE_MAPCOUNT=y
    mprotect_pud_leaf=True,
    madvise_advice=_MADV_5_2 + ("COLD", "PAGEOUT", "POPULATE_READ", "POPULATE_WRITE", "COLLAPSE"),
    fork_copies_shared_hugetlb=False,
    exit_mmap_takes_mmap_lock=True,
    oom_reap_skips_locked=False,
    swapin_exclusive_writable=True,
    wp_huge_split_on_fallback=True,
    pgmap_owner_required=True,
    pagemap_pmd_exclusive_head=False,       # pagemap_pmd_range: page + idx
    device_private_free_at_zero=True,
    do_swap_page_device_lock=False,
    make_device_exclusive_single=False,
    dmirror_release_evicts=True,
    dmirror_flags_ioctl=False,
    large_folio_fs=("xfs",),                # ext4 large folios came in 6.16
    faultaround_maps_folio=False,           # 357b92761d94 is 6.18
    finish_fault_folio="anon_shmem",
    map_large_below_eof=True,               # 74207de2ba10 backported to 6.12.y (6.12.118 has it)
    truncate_partial_folio="split",         # split_folio(): order 0
    thp_split_zero_subpages=True,
    dmirror_tail_pgmap_aliases_head=True,   # page->pgmap aliases compound_head (guest: 0x56 on tails)
    collapse_needs_writable=True,
    collapse_pmd_null_continues=True,
    huge_zero_wp_new_thp=False,             # do_huge_pmd_wp_page(): is_huge_zero_pmd -> goto fallback (guest)
    faultaround_skips_ra_mark=True,         # guest: examples/file_faultaround.toml leaves page 28 unmapped
    mremap_dontunmap=True,
    wp_reuse_large_anon="never",
    i_mmap_walk_shared=True,
    memunmap_put_many=True,
)

PROFILES = {"5.2": V5_2, "6.12": V6_12, "6.18": V6_18}
ALIASES = {"6.x": "6.18", "modern": "6.18", "v5.2": "5.2", "v6.12": "6.12", "v6.18": "6.18"}


def get_profile(name: str) -> KernelProfile:
    """The profile for ``name`` (``"5.2"``, ``"6.12"``, ``"6.18"`` or the alias ``"6.x"``)."""
    key = ALIASES.get(str(name), str(name))
    try:
        return PROFILES[key]
    except KeyError:
        known = ", ".join(sorted(PROFILES) + sorted(ALIASES))
        raise InputError(f"unknown kernel profile {name!r} (known: {known})") from None
