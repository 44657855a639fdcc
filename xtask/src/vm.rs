//! Placeholder until the VM matrix lands (helper writing it).
pub fn run_matrix(_root: &std::path::Path, _bin: &std::path::Path) -> anyhow::Result<()> {
    anyhow::bail!("VM matrix not written yet")
}
