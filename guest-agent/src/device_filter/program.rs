//! [`DeviceRules`] → raw eBPF instructions for `BPF_PROG_TYPE_CGROUP_DEVICE`.
//!
//! Shape of the generated program (r1 = context on entry, r0 = verdict):
//!
//! ```text
//!   r2 = ctx.access_type & 0xffff      device type (1 block, 2 char)
//!   r3 = ctx.access_type >> 16         requested access bits
//!   r4 = ctx.major;  r5 = ctx.minor
//!   for bit in [mknod, read, write]:   one section per access bit
//!       if !(r3 & bit) goto next_section
//!       for rule granting/refusing bit, last rule first:
//!           w1 = (w2 ^ type) | (w4 ^ major) | (w5 ^ minor)
//!                                      (only the fields the rule names)
//!           if r1 != 0 goto next_rule
//!           allow: goto next_section  |  deny: return 0
//!       default deny: return 0
//!   next_section: ...
//!   return 1
//! ```
//!
//! Each rule is one branch on a scratch register rather than a branch per
//! field on r2/r4/r5: a `jne r4, major` teaches the verifier r4's value on
//! one side, the states after each rule then differ and it walks a path per
//! combination (a thousand rules exceeded its one-million-instruction
//! budget). Compared through r1, which is dead at the next rule, every
//! state there is the same and verification stays linear.
//!
//! Sections that can only allow are left out when the default allows. Only
//! forward jumps, every path sets r0 before `exit`, and nothing after a
//! rule that matches unconditionally is emitted, because the verifier
//! rejects unreachable instructions.

use super::{DeviceRules, ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE};

/// One eBPF instruction exactly as the kernel reads it (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst register in the low nibble, src register in the high nibble.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    pub fn dst(&self) -> u8 {
        self.regs & 0x0f
    }

    pub fn src(&self) -> u8 {
        self.regs >> 4
    }
}

/// The opcodes this generator emits (class | operation | source).
pub mod opcode {
    /// `dst = *(u32 *)(src + off)`
    pub const LDX_MEM_W: u8 = 0x61;
    /// `dst = (u32)(dst & imm)`
    pub const ALU32_AND_K: u8 = 0x54;
    /// `dst = (u32)(dst >> imm)`
    pub const ALU32_RSH_K: u8 = 0x74;
    /// `dst = (u32)imm`
    pub const ALU32_MOV_K: u8 = 0xb4;
    /// `dst = (u32)src`
    pub const ALU32_MOV_X: u8 = 0xbc;
    /// `dst = (u32)(dst ^ imm)`
    pub const ALU32_XOR_K: u8 = 0xa4;
    /// `dst = (u32)(dst | src)`
    pub const ALU32_OR_X: u8 = 0x4c;
    /// `pc += off`
    pub const JA: u8 = 0x05;
    /// `if dst != imm: pc += off`
    pub const JNE_K: u8 = 0x55;
    /// `if dst & imm: pc += off`
    pub const JSET_K: u8 = 0x45;
    /// return r0
    pub const EXIT: u8 = 0x95;
}

/// Registers as the generated program uses them.
pub mod reg {
    /// The verdict; also scratch while comparing.
    pub const RESULT: u8 = 0;
    /// The context on entry, then where a rule's comparison accumulates.
    pub const CTX: u8 = 1;
    pub const MISMATCH: u8 = 1;
    pub const TYPE: u8 = 2;
    pub const ACCESS: u8 = 3;
    pub const MAJOR: u8 = 4;
    pub const MINOR: u8 = 5;
}

/// The longest program we generate: every jump offset then fits the
/// instruction's 16 bits, and it stays far below the kernel's limit for
/// privileged loaders (one million).
pub const MAX_INSNS: usize = i16::MAX as usize;

/// Errors generating a program.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("device rule {field} {value} does not fit an eBPF immediate")]
    Value { field: &'static str, value: u32 },
    #[error("device rules need {0} eBPF instructions, more than the {MAX_INSNS} supported")]
    TooLong(usize),
}

#[derive(Clone, Copy)]
struct Label(usize);

/// Instructions with symbolic forward jumps, resolved by `finish`.
#[derive(Default)]
struct Builder {
    insns: Vec<Insn>,
    /// (index of a jump, its target label)
    jumps: Vec<(usize, Label)>,
    /// Instruction index each label is bound to.
    targets: Vec<Option<usize>>,
}

impl Builder {
    fn push(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        });
    }

    fn load_ctx_word(&mut self, dst: u8, offset: i16) {
        self.push(opcode::LDX_MEM_W, dst, reg::CTX, offset, 0);
    }

    fn return_verdict(&mut self, allow: bool) {
        self.push(opcode::ALU32_MOV_K, reg::RESULT, 0, 0, i32::from(allow));
        self.push(opcode::EXIT, 0, 0, 0, 0);
    }

    fn label(&mut self) -> Label {
        self.targets.push(None);
        Label(self.targets.len() - 1)
    }

    fn bind(&mut self, label: Label) {
        self.targets[label.0] = Some(self.insns.len());
    }

    fn jump(&mut self, code: u8, dst: u8, imm: i32, to: Label) {
        self.jumps.push((self.insns.len(), to));
        self.push(code, dst, 0, 0, imm);
    }

    fn finish(mut self) -> Result<Vec<Insn>, ProgramError> {
        if self.insns.len() > MAX_INSNS {
            return Err(ProgramError::TooLong(self.insns.len()));
        }
        for (at, label) in self.jumps {
            // Every label is bound before `finish` and lies after its
            // jumps, so the offset is in 0..MAX_INSNS.
            let target = self.targets[label.0].unwrap_or(self.insns.len());
            let off = target.saturating_sub(at + 1);
            self.insns[at].off =
                i16::try_from(off).map_err(|_| ProgramError::TooLong(self.insns.len()))?;
        }
        Ok(self.insns)
    }
}

fn immediate(field: &'static str, value: u32) -> Result<i32, ProgramError> {
    i32::try_from(value).map_err(|_| ProgramError::Value { field, value })
}

/// Generates the program that enforces `rules`.
pub fn generate(rules: &DeviceRules) -> Result<Vec<Insn>, ProgramError> {
    let mut b = Builder::default();
    b.load_ctx_word(reg::TYPE, 0);
    b.push(opcode::ALU32_AND_K, reg::TYPE, 0, 0, 0xffff);
    b.load_ctx_word(reg::ACCESS, 0);
    b.push(opcode::ALU32_RSH_K, reg::ACCESS, 0, 0, 16);
    b.load_ctx_word(reg::MAJOR, 4);
    b.load_ctx_word(reg::MINOR, 8);

    for bit in [ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE] {
        let deciding: Vec<_> = rules
            .rules
            .iter()
            .rev()
            .filter(|r| r.access & bit != 0)
            .collect();
        if rules.default_allow && deciding.iter().all(|r| r.allow) {
            continue;
        }
        let next_section = b.label();
        let requested = b.label();
        b.jump(opcode::JSET_K, reg::ACCESS, i32::from(bit), requested);
        b.jump(opcode::JA, 0, 0, next_section);
        b.bind(requested);
        let mut decided = false;
        for rule in deciding {
            let next_rule = b.label();
            let checks = [
                (
                    reg::TYPE,
                    rule.kind.map(|k| u32::from(k.bpf_type())),
                    "type",
                ),
                (reg::MAJOR, rule.major, "major"),
                (reg::MINOR, rule.minor, "minor"),
            ];
            let mut conditional = false;
            for (register, value, field) in checks {
                let Some(value) = value else { continue };
                // MISMATCH |= register ^ value, with r0 as scratch after
                // the first field.
                let into = if conditional {
                    reg::RESULT
                } else {
                    reg::MISMATCH
                };
                b.push(opcode::ALU32_MOV_X, into, register, 0, 0);
                b.push(opcode::ALU32_XOR_K, into, 0, 0, immediate(field, value)?);
                if conditional {
                    b.push(opcode::ALU32_OR_X, reg::MISMATCH, reg::RESULT, 0, 0);
                }
                conditional = true;
            }
            if conditional {
                b.jump(opcode::JNE_K, reg::MISMATCH, 0, next_rule);
            }
            if rule.allow {
                b.jump(opcode::JA, 0, 0, next_section);
            } else {
                b.return_verdict(false);
            }
            b.bind(next_rule);
            if !conditional {
                // Matches every device: the rules before it never decide.
                decided = true;
                break;
            }
        }
        if !decided && !rules.default_allow {
            b.return_verdict(false);
        }
        b.bind(next_section);
    }
    b.return_verdict(true);
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_filter::{DeviceKind, DeviceRule, ACCESS_ALL};

    /// Runs a program of our instruction subset on one request, checking
    /// what the verifier would: known opcodes, forward jumps inside the
    /// program, registers written before they are read, r0 set at exit.
    fn run(program: &[Insn], kind: DeviceKind, major: u32, minor: u32, access: u8) -> u32 {
        let ctx = [
            (u32::from(access) << 16) | u32::from(kind.bpf_type()),
            major,
            minor,
        ];
        let mut regs: [Option<u64>; 11] = [None; 11];
        let mut pc = 0usize;
        loop {
            let insn = program.get(pc).expect("ran off the end of the program");
            let (dst, src) = (usize::from(insn.dst()), usize::from(insn.src()));
            let read =
                |r: usize| regs[r].unwrap_or_else(|| panic!("r{r} read before write at {pc}"));
            let imm = insn.imm as u32;
            let mut next = pc + 1;
            match insn.code {
                opcode::LDX_MEM_W => {
                    assert_eq!(src, usize::from(reg::CTX), "load from non-context at {pc}");
                    let word = usize::try_from(insn.off / 4).unwrap();
                    assert_eq!(insn.off % 4, 0);
                    regs[dst] = Some(u64::from(ctx[word]));
                }
                opcode::ALU32_AND_K => regs[dst] = Some(u64::from(read(dst) as u32 & imm)),
                opcode::ALU32_RSH_K => regs[dst] = Some(u64::from((read(dst) as u32) >> imm)),
                opcode::ALU32_MOV_K => regs[dst] = Some(u64::from(imm)),
                opcode::ALU32_MOV_X => regs[dst] = Some(u64::from(read(src) as u32)),
                opcode::ALU32_XOR_K => regs[dst] = Some(u64::from(read(dst) as u32 ^ imm)),
                opcode::ALU32_OR_X => {
                    regs[dst] = Some(u64::from(read(dst) as u32 | read(src) as u32))
                }
                opcode::JA | opcode::JNE_K | opcode::JSET_K => {
                    assert!(insn.off >= 0, "backward jump at {pc}");
                    let imm = i64::from(insn.imm) as u64; // sign-extended, as the kernel does
                    let taken = match insn.code {
                        opcode::JA => true,
                        opcode::JNE_K => read(dst) != imm,
                        _ => read(dst) & imm != 0,
                    };
                    if taken {
                        next += usize::try_from(insn.off).unwrap();
                    }
                }
                opcode::EXIT => return read(0) as u32,
                other => panic!("opcode {other:#04x} at {pc} is not in our subset"),
            }
            pc = next;
        }
    }

    /// Every instruction is reachable (the verifier refuses dead code).
    fn assert_all_reachable(program: &[Insn]) {
        let mut reachable = vec![false; program.len()];
        reachable[0] = true;
        for (pc, insn) in program.iter().enumerate() {
            if !reachable[pc] {
                panic!("instruction {pc} is unreachable in {program:#?}");
            }
            let jump = pc + 1 + usize::try_from(insn.off).unwrap();
            match insn.code {
                opcode::EXIT => {}
                opcode::JA => reachable[jump] = true,
                opcode::JNE_K | opcode::JSET_K => {
                    reachable[jump] = true;
                    reachable[pc + 1] = true;
                }
                _ => reachable[pc + 1] = true,
            }
        }
    }

    fn disassemble(program: &[Insn]) -> Vec<String> {
        program
            .iter()
            .map(|i| {
                let (d, s, off, imm) = (i.dst(), i.src(), i.off, i.imm);
                match i.code {
                    opcode::LDX_MEM_W => format!("r{d} = *(u32 *)(r{s} + {off})"),
                    opcode::ALU32_AND_K => format!("w{d} &= {imm:#x}"),
                    opcode::ALU32_RSH_K => format!("w{d} >>= {imm}"),
                    opcode::ALU32_MOV_K => format!("w{d} = {imm}"),
                    opcode::ALU32_MOV_X => format!("w{d} = w{s}"),
                    opcode::ALU32_XOR_K => format!("w{d} ^= {imm}"),
                    opcode::ALU32_OR_X => format!("w{d} |= w{s}"),
                    opcode::JA => format!("goto +{off}"),
                    opcode::JNE_K => format!("if r{d} != {imm} goto +{off}"),
                    opcode::JSET_K => format!("if r{d} & {imm} goto +{off}"),
                    opcode::EXIT => "exit".to_owned(),
                    other => format!("unknown {other:#x}"),
                }
            })
            .collect()
    }

    fn rule(
        allow: bool,
        kind: Option<DeviceKind>,
        major: Option<u32>,
        minor: Option<u32>,
        access: u8,
    ) -> DeviceRule {
        DeviceRule {
            allow,
            kind,
            major,
            minor,
            access,
        }
    }

    const C: Option<DeviceKind> = Some(DeviceKind::Char);
    const B: Option<DeviceKind> = Some(DeviceKind::Block);

    fn rules(default_allow: bool, list: &[DeviceRule]) -> DeviceRules {
        let mut rules = DeviceRules {
            default_allow,
            rules: Vec::new(),
        };
        for r in list {
            rules.push(*r);
        }
        rules
    }

    fn allowed(rules: &DeviceRules, kind: DeviceKind, major: u32, minor: u32, access: u8) -> bool {
        let program = generate(rules).unwrap();
        assert_all_reachable(&program);
        match run(&program, kind, major, minor, access) {
            0 => false,
            1 => true,
            other => panic!("verdict {other}"),
        }
    }

    #[test]
    fn deny_all_with_one_read_rule_generates_expected_program() {
        let program = generate(&rules(
            false,
            &[rule(true, C, Some(1), Some(3), ACCESS_READ)],
        ))
        .unwrap();
        let expected = [
            "r2 = *(u32 *)(r1 + 0)",
            "w2 &= 0xffff",
            "r3 = *(u32 *)(r1 + 0)",
            "w3 >>= 16",
            "r4 = *(u32 *)(r1 + 4)",
            "r5 = *(u32 *)(r1 + 8)",
            // mknod: no rule grants it
            "if r3 & 1 goto +1",
            "goto +2",
            "w0 = 0",
            "exit",
            // read: c 1:3
            "if r3 & 2 goto +1",
            "goto +12",
            "w1 = w2",
            "w1 ^= 2",
            "w0 = w4",
            "w0 ^= 1",
            "w1 |= w0",
            "w0 = w5",
            "w0 ^= 3",
            "w1 |= w0",
            "if r1 != 0 goto +1",
            "goto +2",
            "w0 = 0",
            "exit",
            // write: no rule grants it
            "if r3 & 4 goto +1",
            "goto +2",
            "w0 = 0",
            "exit",
            "w0 = 1",
            "exit",
        ];
        assert_eq!(disassemble(&program), expected);
        assert_all_reachable(&program);
    }

    #[test]
    fn allow_all_without_denies_generates_only_allow() {
        let program = generate(&rules(true, &[rule(true, C, Some(1), None, ACCESS_ALL)])).unwrap();
        assert_eq!(program.len(), 8, "{:#?}", disassemble(&program));
        assert_eq!(run(&program, DeviceKind::Block, 8, 0, ACCESS_ALL), 1);
    }

    #[test]
    fn deny_all_refuses_everything_but_allowed_device() {
        let r = rules(false, &[rule(true, C, Some(1), Some(3), ACCESS_ALL)]);
        assert!(allowed(
            &r,
            DeviceKind::Char,
            1,
            3,
            ACCESS_READ | ACCESS_WRITE
        ));
        assert!(allowed(&r, DeviceKind::Char, 1, 3, ACCESS_MKNOD));
        assert!(!allowed(&r, DeviceKind::Char, 1, 11, ACCESS_READ));
        assert!(!allowed(&r, DeviceKind::Block, 1, 3, ACCESS_READ));
        assert!(!allowed(&r, DeviceKind::Char, 3, 1, ACCESS_READ));
    }

    #[test]
    fn wildcard_major_and_minor_match_any_number() {
        let r = rules(
            false,
            &[
                rule(true, C, Some(136), None, ACCESS_ALL),
                rule(true, B, None, None, ACCESS_MKNOD),
            ],
        );
        assert!(allowed(
            &r,
            DeviceKind::Char,
            136,
            0,
            ACCESS_READ | ACCESS_WRITE
        ));
        assert!(allowed(&r, DeviceKind::Char, 136, 99_999, ACCESS_WRITE));
        assert!(!allowed(&r, DeviceKind::Char, 137, 0, ACCESS_READ));
        assert!(allowed(&r, DeviceKind::Block, 8, 1, ACCESS_MKNOD));
        assert!(!allowed(&r, DeviceKind::Block, 8, 1, ACCESS_READ));
    }

    #[test]
    fn last_matching_rule_wins() {
        let deny_after_allow = rules(
            false,
            &[
                rule(true, C, Some(1), None, ACCESS_ALL),
                rule(false, C, Some(1), Some(11), ACCESS_ALL),
            ],
        );
        assert!(allowed(
            &deny_after_allow,
            DeviceKind::Char,
            1,
            3,
            ACCESS_READ
        ));
        assert!(!allowed(
            &deny_after_allow,
            DeviceKind::Char,
            1,
            11,
            ACCESS_READ
        ));

        let allow_after_deny = rules(
            false,
            &[
                rule(false, C, Some(1), Some(11), ACCESS_ALL),
                rule(true, C, Some(1), None, ACCESS_ALL),
            ],
        );
        assert!(allowed(
            &allow_after_deny,
            DeviceKind::Char,
            1,
            11,
            ACCESS_READ
        ));
    }

    #[test]
    fn deny_rules_on_default_allow() {
        let r = rules(true, &[rule(false, C, Some(1), Some(11), ACCESS_WRITE)]);
        assert!(allowed(&r, DeviceKind::Char, 1, 11, ACCESS_READ));
        assert!(!allowed(&r, DeviceKind::Char, 1, 11, ACCESS_WRITE));
        assert!(!allowed(
            &r,
            DeviceKind::Char,
            1,
            11,
            ACCESS_READ | ACCESS_WRITE
        ));
        assert!(allowed(&r, DeviceKind::Char, 1, 3, ACCESS_ALL));
    }

    #[test]
    fn access_subsets_need_every_bit_granted() {
        let r = rules(
            false,
            &[rule(true, C, Some(1), Some(3), ACCESS_READ | ACCESS_MKNOD)],
        );
        assert!(allowed(&r, DeviceKind::Char, 1, 3, ACCESS_READ));
        assert!(allowed(&r, DeviceKind::Char, 1, 3, ACCESS_MKNOD));
        assert!(!allowed(&r, DeviceKind::Char, 1, 3, ACCESS_WRITE));
        assert!(!allowed(
            &r,
            DeviceKind::Char,
            1,
            3,
            ACCESS_READ | ACCESS_WRITE
        ));
    }

    #[test]
    fn unconditional_partial_rule_shadows_earlier_rules_without_dead_code() {
        let r = rules(
            false,
            &[
                rule(true, C, Some(1), Some(3), ACCESS_ALL),
                rule(false, None, None, None, ACCESS_READ),
                rule(true, None, None, None, ACCESS_WRITE),
            ],
        );
        assert!(!allowed(&r, DeviceKind::Char, 1, 3, ACCESS_READ));
        assert!(allowed(&r, DeviceKind::Block, 7, 7, ACCESS_WRITE));
        assert!(allowed(&r, DeviceKind::Char, 1, 3, ACCESS_MKNOD));
        assert!(!allowed(&r, DeviceKind::Char, 1, 5, ACCESS_MKNOD));
    }

    #[test]
    fn type_a_rule_with_numbers_matches_char_and_block() {
        let r = rules(false, &[rule(true, None, Some(8), Some(0), ACCESS_READ)]);
        assert!(allowed(&r, DeviceKind::Char, 8, 0, ACCESS_READ));
        assert!(allowed(&r, DeviceKind::Block, 8, 0, ACCESS_READ));
        assert!(!allowed(&r, DeviceKind::Block, 8, 1, ACCESS_READ));
    }

    #[test]
    fn too_many_rules_return_error() {
        let many: Vec<_> = (0..3000)
            .map(|i| rule(i % 2 == 0, C, Some(i), Some(i), ACCESS_ALL))
            .collect();
        let err = generate(&rules(false, &many)).unwrap_err();
        assert!(matches!(err, ProgramError::TooLong(_)), "{err}");
    }

    #[test]
    fn out_of_range_number_returns_error() {
        let err = generate(&rules(
            false,
            &[rule(true, C, Some(u32::MAX), None, ACCESS_ALL)],
        ))
        .unwrap_err();
        assert!(err.to_string().contains("major 4294967295"), "{err}");
    }

    /// A small deterministic generator, so the property test needs no crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, below: u32) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) % u64::from(below)) as u32
        }
        fn pick<T: Copy>(&mut self, from: &[T]) -> T {
            from[self.next(u32::try_from(from.len()).unwrap()) as usize]
        }
    }

    #[test]
    fn program_agrees_with_reference_semantics_on_random_rule_lists() {
        let mut rng = Lcg(0x5eed);
        let kinds = [None, C, B];
        let numbers = [None, Some(1), Some(3), Some(5)];
        for _ in 0..300 {
            let count = rng.next(8);
            let list: Vec<_> = (0..count)
                .map(|_| {
                    rule(
                        rng.next(2) == 1,
                        rng.pick(&kinds),
                        rng.pick(&numbers),
                        rng.pick(&numbers),
                        u8::try_from(rng.next(8)).unwrap(),
                    )
                })
                .collect();
            let r = rules(rng.next(2) == 1, &list);
            let program = generate(&r).unwrap();
            assert_all_reachable(&program);
            for kind in [DeviceKind::Char, DeviceKind::Block] {
                for major in [1, 3, 5, 7] {
                    for minor in [1, 3, 5, 7] {
                        for access in 1..=ACCESS_ALL {
                            let verdict = run(&program, kind, major, minor, access) == 1;
                            assert_eq!(
                                verdict,
                                r.allows(kind, major, minor, access),
                                "{kind:?} {major}:{minor} access {access} under {r:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}
