//! Builds the test guests in tests/guests/ with the system gcc, on demand.
//!
//! Each scenario `tests/guests/NAME.c` is linked with the shared runtime into
//! a PVH ELF image (`build`) or wrapped in a Linux boot-protocol header as a
//! bzImage (`build_bzimage`). Outputs are cached under target/ and rebuilt when
//! a source is newer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-static",
    "-no-pie",
    "-fno-pic",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-O2",
    "-Wall",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
];

fn guests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests")
}

fn out_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-guests");
    std::fs::create_dir_all(&dir).expect("create target/test-guests");
    dir
}

fn newest_source(name: &str) -> SystemTime {
    let dir = guests_dir();
    let mut sources = vec![dir.join(format!("{name}.c")), dir.join(format!("{name}.S"))];
    for entry in std::fs::read_dir(dir.join("runtime")).expect("runtime dir").flatten() {
        sources.push(entry.path());
    }
    sources.push(PathBuf::from(file!()));
    sources.iter().filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).max().expect("sources exist")
}

fn up_to_date(output: &Path, name: &str) -> bool {
    std::fs::metadata(output).and_then(|m| m.modified()).is_ok_and(|built| built >= newest_source(name))
}

/// A temporary name no other thread or process uses.
fn unique_tmp(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    path.with_extension(format!("tmp{}-{n}", std::process::id()))
}

/// Links `name` with `script`; atomic rename so parallel tests are safe.
fn link(name: &str, script: &str, output: &Path) {
    let dir = guests_dir();
    let tmp = unique_tmp(output);
    let mut gcc = Command::new("gcc");
    gcc.args(CFLAGS)
        .arg(format!("-I{}", dir.join("runtime").display()))
        .arg(format!("-Wl,-T,{}", dir.join("runtime").join(script).display()));
    // A scenario in assembly (NAME.S) stands alone, without the runtime.
    let assembly = dir.join(format!("{name}.S"));
    if assembly.exists() {
        gcc.arg(assembly);
    } else {
        gcc.arg(dir.join("runtime/entry.S")).arg(dir.join("runtime/runtime.c")).arg(dir.join(format!("{name}.c")));
    }
    let result = gcc.arg("-o").arg(&tmp).output().expect("run gcc (is it installed? scripts/install-deps.sh)");
    assert!(result.status.success(), "building guest {name} failed:\n{}", String::from_utf8_lossy(&result.stderr));
    std::fs::rename(&tmp, output).expect("move guest into place");
}

/// The PVH ELF image of scenario `name`.
pub fn build(name: &str) -> PathBuf {
    let output = out_dir().join(format!("{name}.elf"));
    if !up_to_date(&output, name) {
        link(name, "pvh.ld", &output);
    }
    output
}

/// Scenario `name` as a bzImage entered through the 64-bit Linux boot protocol.
pub fn build_bzimage(name: &str) -> PathBuf {
    let output = out_dir().join(format!("{name}.bzImage"));
    if up_to_date(&output, name) {
        return output;
    }
    let elf = unique_tmp(&out_dir().join(format!("{name}.bz.elf")));
    link(name, "bzimage.ld", &elf);
    let raw = unique_tmp(&out_dir().join(format!("{name}.bz.bin")));
    let status = Command::new("objcopy").args(["-O", "binary"]).arg(&elf).arg(&raw).status().expect("run objcopy");
    assert!(status.success(), "objcopy failed");
    let body = std::fs::read(&raw).expect("read raw image");
    let _ = std::fs::remove_file(&raw);
    let bss_end = symbol(&elf, "_bss_end");
    let mut image = setup_header(body.len(), (bss_end - 0x10_0000) as u32);
    image.extend_from_slice(&body);
    let _ = std::fs::remove_file(&elf);
    let tmp = unique_tmp(&output);
    std::fs::write(&tmp, image).expect("write bzImage");
    std::fs::rename(&tmp, &output).expect("move bzImage into place");
    output
}

fn symbol(elf: &Path, name: &str) -> u64 {
    let out = Command::new("nm").arg(elf).output().expect("run nm");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            let addr = parts.next()?;
            parts.next()?;
            (parts.next()? == name).then(|| u64::from_str_radix(addr, 16).ok()).flatten()
        })
        .unwrap_or_else(|| panic!("symbol {name} not in {}", elf.display()))
}

/// A minimal real-mode setup block with the Linux boot protocol header
/// (Documentation/arch/x86/boot.rst): 4 setup sectors plus the boot sector.
fn setup_header(body_len: usize, init_size: u32) -> Vec<u8> {
    const SETUP_SECTS: u8 = 4;
    let mut setup = vec![0u8; (SETUP_SECTS as usize + 1) * 512];
    let put = |buf: &mut Vec<u8>, off: usize, bytes: &[u8]| buf[off..off + bytes.len()].copy_from_slice(bytes);
    put(&mut setup, 0x1f1, &[SETUP_SECTS]); // setup_sects
    put(&mut setup, 0x1f4, &(body_len.div_ceil(16) as u32).to_le_bytes()); // syssize (16-byte units)
    put(&mut setup, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(&mut setup, 0x200, &[0xeb, 0x66]); // jump over the header
    put(&mut setup, 0x202, b"HdrS"); // header magic
    put(&mut setup, 0x206, &0x020fu16.to_le_bytes()); // protocol 2.15
    put(&mut setup, 0x211, &[0x01]); // loadflags: LOADED_HIGH
    put(&mut setup, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut setup, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut setup, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut setup, 0x236, &0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(&mut setup, 0x238, &0x0000_07ffu32.to_le_bytes()); // cmdline_size
    put(&mut setup, 0x258, &0x10_0000u64.to_le_bytes()); // pref_address
    put(&mut setup, 0x260, &init_size.to_le_bytes()); // init_size
    setup
}
