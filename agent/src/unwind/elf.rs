//! What unwinding needs from an ELF file: its `.eh_frame` / `.eh_frame_hdr`
//! (DWARF call frame information), its loadable segments (to place it in a
//! process), and whether its functions keep frame pointers.

use std::{ops::Range, path::Path, sync::Arc};

use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// Errors reading a binary.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not an ELF file we can parse.
    #[error("parsing {path}: {source}")]
    Parse {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: object::Error,
    },
}

/// A loadable segment: file range and its address in the file's own space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// File offset.
    pub offset: u64,
    /// Virtual address (SVMA).
    pub vaddr: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Executable.
    pub exec: bool,
}

/// How many functions set up a frame pointer, out of those checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FramePointerUsage {
    /// Function entries examined.
    pub checked: usize,
    /// Entries starting with `push %rbp; mov %rsp,%rbp`.
    pub with_frame_pointer: usize,
}

impl FramePointerUsage {
    /// Enough functions set up rbp as a frame pointer. gcc omits the frame
    /// of leaf functions even with -fno-omit-frame-pointer, and the C
    /// runtime's start-up functions never have one, so a third is the bar;
    /// binaries built without frame pointers measure at or near zero.
    pub fn has_frame_pointers(&self) -> bool {
        self.checked > 0 && self.with_frame_pointer * 3 >= self.checked
    }
}

/// The unwind data of one file, shared by every process that maps it.
#[derive(Debug)]
pub struct UnwindData {
    /// `.eh_frame` address range and contents.
    pub eh_frame: Option<(Range<u64>, Arc<[u8]>)>,
    /// `.eh_frame_hdr` address range and contents (the binary-search index).
    pub eh_frame_hdr: Option<(Range<u64>, Arc<[u8]>)>,
    /// `.debug_frame`, for binaries that only have that.
    pub debug_frame: Option<Arc<[u8]>>,
    /// `.text` address range.
    pub text: Option<Range<u64>>,
    /// `.got` address range (for got-relative CFI pointers).
    pub got: Option<Range<u64>>,
    /// PT_LOAD segments.
    pub segments: Vec<Segment>,
    /// Frame pointer usage of the functions.
    pub frame_pointers: FramePointerUsage,
}

impl UnwindData {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Self, ElfError> {
        let name = || path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ElfError::Read { path: name(), source })?;
        let file = object::File::parse(&*bytes).map_err(|source| ElfError::Parse { path: name(), source })?;
        let section = |name: &str| {
            let s = file.section_by_name(name)?;
            let data = s.data().ok()?;
            Some((s.address()..s.address() + s.size(), Arc::<[u8]>::from(data)))
        };
        let range = |name: &str| {
            file.section_by_name(name)
                .map(|s| s.address()..s.address() + s.size())
        };
        let segments: Vec<Segment> = file
            .segments()
            .map(|s| {
                let (offset, filesz) = s.file_range();
                let exec = match s.flags() {
                    object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                    _ => false,
                };
                Segment {
                    offset,
                    vaddr: s.address(),
                    filesz,
                    exec,
                }
            })
            .collect();
        let eh_frame_hdr = section(".eh_frame_hdr");
        let frame_pointers = eh_frame_hdr
            .as_ref()
            .map(|(svma, hdr)| frame_pointer_usage(svma.start, hdr, &file))
            .unwrap_or_default();
        Ok(Self {
            eh_frame: section(".eh_frame"),
            eh_frame_hdr,
            debug_frame: section(".debug_frame").map(|(_, d)| d),
            text: range(".text"),
            got: range(".got"),
            segments,
            frame_pointers,
        })
    }

    /// Load bias of a mapping of this file at `start` from file `offset`:
    /// add it to an address of the file (SVMA) to get the address in the
    /// process (AVMA).
    pub fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        let seg = self
            .segments
            .iter()
            .filter(|s| s.filesz > 0)
            .find(|s| offset >= s.offset & !0xfff && offset < s.offset + s.filesz)?;
        let vaddr_of_offset = seg.vaddr.wrapping_add(offset).wrapping_sub(seg.offset);
        Some(start.wrapping_sub(vaddr_of_offset))
    }
}

/// Function start addresses from the `.eh_frame_hdr` search table, when it
/// uses the (near universal) datarel|sdata4 encoding.
pub fn function_starts(hdr_svma: u64, hdr: &[u8]) -> Vec<u64> {
    // version, eh_frame_ptr_enc, fde_count_enc, table_enc
    let [1, ptr_enc, count_enc, 0x3b, ..] = *hdr else {
        return Vec::new();
    };
    let mut pos = 4;
    // eh_frame_ptr: skip by its encoding's size.
    pos += match ptr_enc & 0x0f {
        0x03 | 0x0b => 4,
        0x04 | 0x0c => 8,
        _ => return Vec::new(),
    };
    let count = match count_enc & 0x0f {
        0x03 | 0x0b => hdr
            .get(pos..pos + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize),
        _ => None,
    };
    let Some(count) = count else { return Vec::new() };
    pos += 4;
    (0..count)
        .filter_map(|i| {
            let at = pos + i * 8;
            let rel = i32::from_le_bytes(hdr.get(at..at + 4)?.try_into().ok()?);
            Some(hdr_svma.wrapping_add_signed(i64::from(rel)))
        })
        .collect()
}

/// Bytes of a function searched for the frame setup. gcc's shrink-wrapping
/// moves it past early exits, loads, even into the path to a call.
const PROLOGUE_WINDOW: usize = 128;

/// Whether a function sets up rbp as frame pointer near its start:
/// `mov %rsp,%rbp` (either encoding). Code compiled without frame pointers
/// may use rbp as a plain callee-saved register, but has no reason to copy
/// the stack pointer into it. `code` should end where the function ends.
pub fn sets_frame_pointer(code: &[u8]) -> bool {
    let code = &code[..code.len().min(PROLOGUE_WINDOW)];
    code.windows(3)
        .any(|w| matches!(w, [0x48, 0x89, 0xe5] | [0x48, 0x8b, 0xec]))
}

/// Checks up to 400 functions spread over the file.
fn frame_pointer_usage(hdr_svma: u64, hdr: &[u8], file: &object::File<'_>) -> FramePointerUsage {
    let mut starts = function_starts(hdr_svma, hdr);
    starts.sort_unstable();
    let step = (starts.len() / 400).max(1);
    let mut usage = FramePointerUsage::default();
    for (i, &addr) in starts.iter().enumerate().step_by(step) {
        // Up to the next function, so its prologue is not mistaken for ours.
        let len = starts
            .get(i + 1)
            .map_or(PROLOGUE_WINDOW as u64, |next| next - addr) as usize;
        let code = file.sections().find_map(|s| {
            let a = s.address();
            if addr < a || addr >= a + s.size() {
                return None;
            }
            let data = s.data().ok()?;
            let from = (addr - a) as usize;
            data.get(from..(from + len).min(data.len()))
        });
        if let Some(code) = code {
            usage.checked += 1;
            usage.with_frame_pointer += usize::from(sets_frame_pointer(code));
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test the prologue patterns, with and without endbr64.
    #[test]
    fn prologues() {
        assert!(sets_frame_pointer(&[0x55, 0x48, 0x89, 0xe5, 0x90]));
        assert!(sets_frame_pointer(&[
            0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5
        ]));
        // Shrink-wrapped: two loads, then the frame (gcc -O2 -fno-omit-frame-pointer).
        let wrapped = [
            0x8b, 0x05, 0x22, 0x2b, 0, 0, 0x8b, 0x3d, 0xd0, 0x2a, 0, 0, 0x55, 0x48, 0x89, 0xe5,
        ];
        assert!(sets_frame_pointer(&wrapped));
        // push %rbp; mov $1,%edi; mov %rsp,%rbp (interleaved).
        assert!(sets_frame_pointer(&[0x55, 0xbf, 1, 0, 0, 0, 0x48, 0x89, 0xe5]));
        assert!(!sets_frame_pointer(&[0x41, 0x57, 0x41, 0x56])); // push r15; push r14
        assert!(!sets_frame_pointer(&[0x48, 0x83, 0xec, 0x08])); // sub $8,%rsp
        assert!(!sets_frame_pointer(&[0x55, 0x53, 0x48, 0x83, 0xec, 0x08])); // rbp as a plain register
                                                                             // The next function's frame setup is not ours.
        assert!(!sets_frame_pointer(&[0xc3, 0x55, 0x48, 0x89, 0xe5][..1]));
    }

    /// Test the eh_frame_hdr table parser on a hand-built header.
    #[test]
    fn hdr_table() {
        let mut hdr = vec![1, 0x1b, 0x03, 0x3b];
        hdr.extend(100i32.to_le_bytes()); // eh_frame_ptr
        hdr.extend(2u32.to_le_bytes()); // fde_count
        for (loc, fde) in [(-0x40i32, 8i32), (-0x20, 16)] {
            hdr.extend(loc.to_le_bytes());
            hdr.extend(fde.to_le_bytes());
        }
        assert_eq!(function_starts(0x1000, &hdr), vec![0x1000 - 0x40, 0x1000 - 0x20]);
        assert!(function_starts(0x1000, &[2, 0, 0, 0]).is_empty());
    }

    /// Test that our own binary (Rust, release: no frame pointers) has
    /// unwind info and reads as "no frame pointers", and that a mapping's
    /// bias is consistent with where our code runs.
    #[test]
    fn reads_own_binary() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let data = UnwindData::read(&exe).expect("read own ELF");
        assert!(data.eh_frame.is_some() && data.eh_frame_hdr.is_some());
        assert!(data.frame_pointers.checked > 50, "{:?}", data.frame_pointers);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = crate::symbolize::parse_maps(&maps)
            .into_iter()
            .find(|l| l.perms.contains('x') && std::path::Path::new(&l.path) == exe)
            .expect("own text mapping");
        let bias = data.bias(line.start, line.offset).expect("bias");
        let text = data.text.clone().expect(".text");
        let here = reads_own_binary as *const () as u64;
        assert!(
            text.contains(&here.wrapping_sub(bias)),
            "{here:#x} - {bias:#x} in {text:x?}"
        );
    }
}
