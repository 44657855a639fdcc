//! Kernel-struct offsets from the running kernel's BTF, and tracepoint field offsets from
//! the tracepoint format files: what the kernel programs need instead of CO-RE.

use std::{collections::HashMap, fs, path::Path};

use btf_rs::{Btf, Type};
use k8s_ebpf_common::KernelOffsets;

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error(
        "cannot read kernel BTF at {path}: {source} (k8s-ebpf needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y, Linux 5.4 or later)"
    )]
    Btf { path: String, source: btf_rs::Error },
    #[error("kernel BTF has no struct {0}")]
    MissingStruct(String),
    #[error("kernel BTF: struct {strukt} has no member {member}")]
    MissingMember { strukt: String, member: String },
    #[error("kernel BTF lookup failed: {0}")]
    Lookup(#[from] btf_rs::Error),
    #[error("cannot read tracepoint format {path}: {source}")]
    Format {
        path: String,
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint} has no field {field} (or it has an unexpected size)")]
    MissingField {
        tracepoint: &'static str,
        field: &'static str,
    },
}

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Byte offset of a member path (`["skc_net", "net"]`) inside a named struct. Anonymous
/// struct and union members are searched through, as the kernel nests most socket fields in
/// them.
pub fn member_offset(btf: &Btf, strukt: &str, path: &[&str]) -> Result<u32, OffsetError> {
    let mut current = btf
        .resolve_types_by_name(strukt)
        .map_err(|_| OffsetError::MissingStruct(strukt.to_owned()))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or_else(|| OffsetError::MissingStruct(strukt.to_owned()))?;
    let mut total_bits = 0u32;
    for (i, name) in path.iter().enumerate() {
        let (bits, member) =
            find_member(btf, &current, name)?.ok_or_else(|| OffsetError::MissingMember {
                strukt: strukt.to_owned(),
                member: path[..=i].join("."),
            })?;
        total_bits += bits;
        if i + 1 < path.len() {
            current = struct_of(btf, &member)?.ok_or_else(|| OffsetError::MissingMember {
                strukt: strukt.to_owned(),
                member: path[..=i + 1].join("."),
            })?;
        }
    }
    Ok(total_bits / 8)
}

/// The byte offset of a member that is a whole field (not a bitfield), or `None`.
pub fn plain_member_offset(btf: &Btf, strukt: &str, name: &str) -> Option<u32> {
    let s = btf
        .resolve_types_by_name(strukt)
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })?;
    let (bits, member) = find_member(btf, &s, name).ok()??;
    (member.bitfield_size().unwrap_or(0) == 0 && bits % 8 == 0).then_some(bits / 8)
}

/// Finds `name` in `s`, descending into anonymous members; returns its bit offset.
fn find_member(
    btf: &Btf,
    s: &btf_rs::Struct,
    name: &str,
) -> Result<Option<(u32, btf_rs::Member)>, OffsetError> {
    for member in &s.members {
        let member_name = btf.resolve_name(member).unwrap_or_default();
        if member_name == name {
            return Ok(Some((member.bit_offset(), member.clone())));
        }
        if member_name.is_empty() {
            if let Some(inner) = struct_of(btf, member)? {
                if let Some((bits, found)) = find_member(btf, &inner, name)? {
                    return Ok(Some((member.bit_offset() + bits, found)));
                }
            }
        }
    }
    Ok(None)
}

/// The struct or union a member's type resolves to, through typedefs and qualifiers.
fn struct_of(btf: &Btf, member: &btf_rs::Member) -> Result<Option<btf_rs::Struct>, OffsetError> {
    let mut ty = btf.resolve_chained_type(member)?;
    // Bounded: qualifier chains in kernel BTF are a handful deep.
    for _ in 0..16 {
        ty = match ty {
            Type::Struct(s) | Type::Union(s) => return Ok(Some(s)),
            Type::Typedef(t) => btf.resolve_chained_type(&t)?,
            Type::Const(t) => btf.resolve_chained_type(&t)?,
            Type::Volatile(t) => btf.resolve_chained_type(&t)?,
            Type::TypeTag(t) => btf.resolve_chained_type(&t)?,
            _ => return Ok(None),
        };
    }
    Ok(None)
}

/// Field name → (offset, size) from a tracepoint `format` file.
pub fn parse_format(text: &str) -> HashMap<String, (u32, u32)> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';').map(str::trim);
        let decl = parts.next().unwrap_or_default();
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        // "const void * skaddr", "__u8 saddr[4]" → the last word, without the array suffix.
        let name = decl
            .rsplit([' ', '*'])
            .next()
            .unwrap_or_default()
            .split('[')
            .next()
            .unwrap_or_default();
        if let (Some(o), Some(s)) = (offset, size) {
            fields.insert(name.to_owned(), (o, s));
        }
    }
    fields
}

pub fn tracefs_root() -> &'static Path {
    Path::new("/sys/kernel/tracing")
}

fn read_format(category: &str, name: &str) -> Result<HashMap<String, (u32, u32)>, OffsetError> {
    let path = tracefs_root()
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = fs::read_to_string(&path).map_err(|source| OffsetError::Format {
        path: path.display().to_string(),
        source,
    })?;
    Ok(parse_format(&text))
}

fn field(
    fields: &HashMap<String, (u32, u32)>,
    tracepoint: &'static str,
    field: &'static str,
    size: u32,
) -> Result<u32, OffsetError> {
    match fields.get(field) {
        Some((offset, s)) if *s == size => Ok(*offset),
        _ => Err(OffsetError::MissingField { tracepoint, field }),
    }
}

/// Reads every offset the kernel programs need from this kernel.
pub fn kernel_offsets() -> Result<KernelOffsets, OffsetError> {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|source| OffsetError::Btf {
        path: VMLINUX_BTF.to_owned(),
        source,
    })?;
    let sc = |path: &[&str]| member_offset(&btf, "sock_common", path);
    const SET_STATE: &str = "sock/inet_sock_set_state";
    let tp = read_format("sock", "inet_sock_set_state")?;
    Ok(KernelOffsets {
        skc_daddr: sc(&["skc_daddr"])?,
        skc_rcv_saddr: sc(&["skc_rcv_saddr"])?,
        skc_dport: sc(&["skc_dport"])?,
        skc_num: sc(&["skc_num"])?,
        skc_family: sc(&["skc_family"])?,
        skc_net: sc(&["skc_net", "net"])?,
        skc_v6_daddr: sc(&["skc_v6_daddr"])?,
        skc_v6_rcv_saddr: sc(&["skc_v6_rcv_saddr"])?,
        net_ns_inum: member_offset(&btf, "net", &["ns", "inum"])?,
        tp_skaddr: field(&tp, SET_STATE, "skaddr", 8)?,
        tp_oldstate: field(&tp, SET_STATE, "oldstate", 4)?,
        tp_newstate: field(&tp, SET_STATE, "newstate", 4)?,
        tp_sport: field(&tp, SET_STATE, "sport", 2)?,
        tp_dport: field(&tp, SET_STATE, "dport", 2)?,
        tp_family: field(&tp, SET_STATE, "family", 2)?,
        tp_protocol: field(&tp, SET_STATE, "protocol", 2)?,
        tp_saddr: field(&tp, SET_STATE, "saddr", 4)?,
        tp_daddr: field(&tp, SET_STATE, "daddr", 4)?,
        tp_saddr_v6: field(&tp, SET_STATE, "saddr_v6", 16)?,
        tp_daddr_v6: field(&tp, SET_STATE, "daddr_v6", 16)?,
        sk_protocol: plain_member_offset(&btf, "sock", "sk_protocol")
            .unwrap_or(KernelOffsets::UNAVAILABLE),
        task_mm: member_offset(&btf, "task_struct", &["mm"])?,
        mm_exe_file: member_offset(&btf, "mm_struct", &["exe_file"])?,
        file_f_inode: member_offset(&btf, "file", &["f_inode"])?,
        inode_i_ino: member_offset(&btf, "inode", &["i_ino"])?,
        inode_i_sb: member_offset(&btf, "inode", &["i_sb"])?,
        sb_s_dev: member_offset(&btf, "super_block", &["s_dev"])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tracepoint_format() {
        let text = "name: inet_sock_set_state\nID: 1\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\
            \tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
            \tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;\n\
            \tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;\n\
            \tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n";
        let f = parse_format(text);
        assert_eq!(f["skaddr"], (8, 8));
        assert_eq!(f["sport"], (24, 2));
        assert_eq!(f["saddr"], (32, 4));
        assert_eq!(f["saddr_v6"], (40, 16));
        assert_eq!(f["common_type"], (0, 2));
    }

    /// Runs against the kernel this test runs on: the offsets must be found, and the ones
    /// whose layout has been stable for years must have their well-known values.
    #[test]
    fn reads_offsets_from_this_kernels_btf() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: {VMLINUX_BTF} missing (kernel without CONFIG_DEBUG_INFO_BTF)");
            return;
        }
        let btf = Btf::from_file(VMLINUX_BTF).expect("vmlinux BTF parses");
        // struct sock_common starts with the skc_addrpair union: daddr at 0, rcv_saddr at 4.
        assert_eq!(
            member_offset(&btf, "sock_common", &["skc_daddr"]).unwrap(),
            0
        );
        assert_eq!(
            member_offset(&btf, "sock_common", &["skc_rcv_saddr"]).unwrap(),
            4
        );
        assert_eq!(
            member_offset(&btf, "sock_common", &["skc_dport"]).unwrap(),
            12
        );
        assert_eq!(
            member_offset(&btf, "sock_common", &["skc_num"]).unwrap(),
            14
        );
        assert_eq!(
            member_offset(&btf, "sock_common", &["skc_family"]).unwrap(),
            16
        );
        assert!(member_offset(&btf, "net", &["ns", "inum"]).unwrap() > 0);
        assert!(matches!(
            member_offset(&btf, "sock_common", &["no_such_member"]),
            Err(OffsetError::MissingMember { .. })
        ));
    }
}
