//! Where things are in the running kernel's `struct module` and its module bookkeeping,
//! from the live kernel's BTF: no offset is hard-coded, so a kernel built with other
//! options (or a later stable release) gets the right layout or a clear refusal.

use lucos_introspect::btf::{Btf, BtfError};

/// Offsets (bytes) in `struct module` and the structures lucos fills in for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmodLayout {
    pub size: u64,
    pub state: u64,
    pub list: u64,
    pub name: u64,
    pub name_len: u64,
    pub refcnt: u64,
    pub source_list: u64,
    pub target_list: u64,
    pub taints: u64,
    pub base: u64,
    pub core_size: u64,
    pub text_size: u64,
    pub ro_size: u64,
    pub ro_after_init_size: u64,
    /// `core_layout.mtn.mod` and `core_layout.mtn.node` (two `rb_node`s, one per tree).
    pub mtn_mod: u64,
    pub mtn_node: u64,
    pub kallsyms: u64,
    pub core_kallsyms: u64,
    pub extable: u64,
    pub num_exentries: u64,
    pub bug_list: u64,
    pub bug_table: u64,
    pub num_bugs: u64,
    pub num_orcs: u64,
    pub orc_unwind_ip: u64,
    pub orc_unwind: u64,
    pub jump_entries: u64,
    pub num_jump_entries: u64,
    /// `struct static_key`: `enabled` and the `type`/`entries`/`next` word.
    pub key_enabled: u64,
    pub key_type: u64,
    /// `struct static_key_mod`: `next`, `entries`, `mod`; and its size.
    pub skm_next: u64,
    pub skm_entries: u64,
    pub skm_mod: u64,
    pub skm_size: u64,
    /// `build_id` (`CONFIG_STACKTRACE_BUILD_ID`): printed after the module name in traces.
    pub build_id: Option<u64>,
    /// `struct mod_kallsyms`.
    pub ks_symtab: u64,
    pub ks_num_symtab: u64,
    pub ks_strtab: u64,
    pub ks_typetab: u64,
    /// `struct mod_tree_root`: the latch's sequence count, its two trees, the bounds.
    pub tree_seq: u64,
    pub tree_roots: u64,
    pub tree_addr_min: u64,
    pub tree_addr_max: u64,
    /// `struct mutex`'s owner word: non-zero while someone holds it.
    pub mutex_owner: u64,
    /// `struct module_layout`: its `base` and `mtn.node` (a tree node may belong to a
    /// module's init layout as well as to its core layout).
    pub layout_base: u64,
    pub layout_node: u64,
    /// The module's export tables (`struct kernel_symbol` arrays, sorted by name) and
    /// their counts: `syms`/`num_syms`, and the GPL-only `gpl_syms`/`num_gpl_syms`.
    pub syms: u64,
    pub num_syms: u64,
    pub gpl_syms: u64,
    pub num_gpl_syms: u64,
    /// `struct module_use`: `source_list` (on the used module's `source_list`) and
    /// `source`, the module that uses it.
    pub use_source_list: u64,
    pub use_source: u64,
}

impl KmodLayout {
    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let m = |p: &str| btf.offset_of("module", p);
        let k = |p: &str| btf.offset_of("mod_kallsyms", p);
        let t = |p: &str| btf.offset_of("mod_tree_root", p);
        Ok(KmodLayout {
            size: btf.struct_size("module")?,
            state: m("state")?,
            list: m("list")?,
            name: m("name")?,
            name_len: btf.array_len("module", "name")?,
            refcnt: m("refcnt")?,
            source_list: m("source_list")?,
            target_list: m("target_list")?,
            taints: m("taints")?,
            base: m("core_layout.base")?,
            core_size: m("core_layout.size")?,
            text_size: m("core_layout.text_size")?,
            ro_size: m("core_layout.ro_size")?,
            ro_after_init_size: m("core_layout.ro_after_init_size")?,
            mtn_mod: m("core_layout.mtn.mod")?,
            mtn_node: m("core_layout.mtn.node")?,
            kallsyms: m("kallsyms")?,
            core_kallsyms: m("core_kallsyms")?,
            extable: m("extable")?,
            num_exentries: m("num_exentries")?,
            bug_list: m("bug_list")?,
            bug_table: m("bug_table")?,
            num_bugs: m("num_bugs")?,
            num_orcs: m("arch.num_orcs")?,
            orc_unwind_ip: m("arch.orc_unwind_ip")?,
            orc_unwind: m("arch.orc_unwind")?,
            build_id: m("build_id").ok(),
            jump_entries: m("jump_entries")?,
            num_jump_entries: m("num_jump_entries")?,
            key_enabled: btf.offset_of("static_key", "enabled")?,
            key_type: btf.offset_of("static_key", "type")?,
            skm_next: btf.offset_of("static_key_mod", "next")?,
            skm_entries: btf.offset_of("static_key_mod", "entries")?,
            skm_mod: btf.offset_of("static_key_mod", "mod")?,
            skm_size: btf.struct_size("static_key_mod")?,
            ks_symtab: k("symtab")?,
            ks_num_symtab: k("num_symtab")?,
            ks_strtab: k("strtab")?,
            ks_typetab: k("typetab")?,
            tree_seq: t("root.seq")?,
            tree_roots: t("root.tree")?,
            tree_addr_min: t("addr_min")?,
            tree_addr_max: t("addr_max")?,
            mutex_owner: btf.offset_of("mutex", "owner")?,
            layout_base: btf.offset_of("module_layout", "base")?,
            layout_node: btf.offset_of("module_layout", "mtn.node")?,
            syms: m("syms")?,
            num_syms: m("num_syms")?,
            gpl_syms: m("gpl_syms")?,
            num_gpl_syms: m("num_gpl_syms")?,
            use_source_list: btf.offset_of("module_use", "source_list")?,
            use_source: btf.offset_of("module_use", "source")?,
        })
    }

    /// The `rb_node` of this module in tree `idx` (0 or 1) of the latch.
    pub fn node(&self, module: u64, idx: u64) -> u64 {
        module + self.mtn_node + idx * super::rbtree::NODE_SIZE
    }

    /// Where the key of a tree node is: the `base` of the layout the node is in
    /// (`__mod_tree_val`).
    pub fn key_addr(&self, node: u64, idx: u64) -> u64 {
        node - idx * super::rbtree::NODE_SIZE - self.layout_node + self.layout_base
    }
}
