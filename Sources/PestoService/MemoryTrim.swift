// SPDX-License-Identifier: GPL-2.0-or-later

// MemoryTrim: gives the memory a large table held back to the system once it has shrunk.
//
// glibc's malloc keeps freed memory for reuse: after a 65,535-rule table is removed, pestod's
// RSS stayed at about 100 MB. `malloc_trim(0)` returns the free pages of every arena; it walks
// the heap, so it runs on a short-lived thread of its own rather than on the event loop, once
// a committed change has deleted `deletesWorthTrimming` rules or more.

import CPestoSys

#if canImport(Glibc)
    import Glibc
#endif

/// Returns free heap memory to the system after large deletions.
enum MemoryTrim {
    /// A committed change deleting at least this many rules is followed by a trim.
    static let deletesWorthTrimming = 1024

    /// Trims on a detached thread if `journal` deleted enough rules.
    static func after(_ journal: Journal) {
        var deletes = 0
        for op in journal.operations {
            if case .delete = op { deletes += 1 }
        }
        guard deletes >= deletesWorthTrimming else { return }
        var thread = pthread_t()
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
        defer { pthread_attr_destroy(&attributes) }
        // No thread (EAGAIN): the memory stays with malloc, to be reused; nothing else changes.
        _ = pthread_create(
            &thread, &attributes,
            { _ in
                _ = pesto_malloc_trim()
                return nil
            }, nil)
    }
}
