// Package combine builds a new LoRA adapter out of several: adapter arithmetic, Hugging Face
// PEFT's LoraModel.add_weighted_adapter (src/peft/tuners/lora/model.py, with the merge rules of
// src/peft/utils/merge_utils.py), over adapters in memory (Combine) or over PEFT adapter folders
// (CombineDirs, ReadFolder, WriteFolder), whose result loads like any LoRA adapter
// (peft.Model.Load, peft/methods.FromFolder, examples/merge).
//
// Every adapter is a set of layers, each with lora_A [r, in], lora_B [out, r] (PyTorch's layout,
// as PEFT keeps them) and a scale s (lora_alpha/r, or lora_alpha/√r with rsLoRA); its update of
// a layer is ΔW = s·B·A [out, in]. With weights wᵢ, the types follow PEFT's definitions exactly,
// which are not all "the weighted sum of the updates, Σ wᵢ·ΔWᵢ":
//
//   - cat: A = concat(wᵢ·sᵢ·Aᵢ) by rows, B = concat(Bᵢ) by columns, so B·A = Σ wᵢ·ΔWᵢ exactly: the
//     weighted sum of the updates. The rank is the sum of the ranks.
//   - linear, ties, dare_linear, dare_ties, magnitude_prune: the A's and the B's are merged
//     separately, A = merge(Aᵢ, ±√|wᵢ·sᵢ|) (the sign of wᵢ·sᵢ on A alone), B = merge(Bᵢ, √|wᵢ·sᵢ|).
//     For linear, B·A = Σᵢ Σⱼ √(wᵢsᵢ)√(wⱼsⱼ)·Bᵢ·Aⱼ, which has cross terms Bᵢ·Aⱼ: it is the
//     weighted sum of the updates only for one adapter. All adapters must have the same rank.
//   - svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: the updates are merged,
//     ΔW = merge(ΔWᵢ, wᵢ·sᵢ) (PEFT weighs the updates, which already include sᵢ, by wᵢ·sᵢ: the scale
//     counts twice, so svd gives Σ wᵢ·ΔWᵢ only when every sᵢ is 1), then cut to the best rank-k
//     approximation by a singular value decomposition: B = U_k·diag(S_k), A = V_kᵀ.
//
// The merge rules are task arithmetic (Σ wᵢ·tᵢ), magnitude pruning (keep the
// ⌊density·n⌋ entries of largest magnitude of each tᵢ, then task arithmetic), TIES (magnitude
// pruning, a sign elected per entry from the pruned tensors, then the mean of the weighted entries
// that agree with it) and DARE (keep each entry with probability density and divide by density,
// then task arithmetic, or TIES' sign election and disjoint merge).
//
// With a single adapter every type is linear, as in PEFT. The new adapter has r = lora_alpha =
// its rank (scale 1), target_modules the union of the inputs', no rank_pattern or alpha_pattern
// except where a layer's rank differs from r (see Combine), and use_rslora false.
package combine

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"

	"peft/peft"
)

// Type is a combination type: PEFT's combination_type.
type Type string

// The combination types (see the package comment for each one's formula).
const (
	Linear            Type = "linear"
	Cat               Type = "cat"
	SVD               Type = "svd"
	TIES              Type = "ties"
	TIESSVD           Type = "ties_svd"
	DARELinear        Type = "dare_linear"
	DARETIES          Type = "dare_ties"
	DARELinearSVD     Type = "dare_linear_svd"
	DARETIESSVD       Type = "dare_ties_svd"
	MagnitudePrune    Type = "magnitude_prune"
	MagnitudePruneSVD Type = "magnitude_prune_svd"
)

// Types lists every combination type, in PEFT's documentation order.
func Types() []Type {
	return []Type{SVD, Linear, Cat, TIES, TIESSVD, DARETIES, DARELinear, DARETIESSVD, DARELinearSVD, MagnitudePrune, MagnitudePruneSVD}
}

// rule is the merge rule behind a type other than cat.
func (t Type) rule() rule {
	switch strings.TrimSuffix(string(t), "_svd") {
	case "ties":
		return ruleTIES
	case "dare_linear":
		return ruleDARELinear
	case "dare_ties":
		return ruleDARETIES
	case "magnitude_prune":
		return ruleMagnitudePrune
	}
	return ruleTaskArithmetic // linear, svd
}

// isSVD reports whether the type decomposes the merged update (PEFT's *_svd types and svd).
func (t Type) isSVD() bool { return t == SVD || strings.HasSuffix(string(t), "_svd") }

// Majority-sign methods of TIES (Config.MajoritySign).
const (
	// SignTotal elects the sign of the sum of the entries.
	SignTotal = "total"
	// SignFrequency elects the sign most entries have.
	SignFrequency = "frequency"
)

// Config configures a combination: PEFT's add_weighted_adapter arguments. Start from
// DefaultConfig and set Weights.
type Config struct {
	// Type is the combination type. Default SVD, PEFT's default.
	Type Type `json:"combination_type"`
	// Weights has one weight per adapter, in order; negative weights subtract. Required.
	Weights []float64 `json:"weights"`
	// SVDRank is the rank of the result for the svd types; 0 (default) means the largest rank of
	// the inputs, as PEFT's svd_rank None. It must not exceed min(in, out) of any layer.
	SVDRank int `json:"svd_rank,omitempty"`
	// SVDClamp, for the svd types, clamps the entries of both factors to ±q, q the SVDClamp
	// quantile (linear interpolation, torch.quantile's) of all their entries together: PEFT's
	// svd_clamp. 0 (default) means no clamping; otherwise in (0, 1].
	SVDClamp float64 `json:"svd_clamp,omitempty"`
	// Density is the fraction of entries kept by the pruning types (ties, dare_*,
	// magnitude_prune and their _svd forms), in (0, 1]; 1 keeps everything. Required by them and
	// refused by the others (0, the default, means unset). PEFT also accepts 0 (an all-zero
	// adapter, or NaN for DARE, which divides by the density) and values above 1 (read as 1).
	Density float64 `json:"density,omitempty"`
	// MajoritySign is how TIES elects the sign of each entry (ties, dare_ties and their _svd
	// forms): SignTotal (default, the sign of the sum) or SignFrequency (the most common sign).
	MajoritySign string `json:"majority_sign_method"`
	// Seed drives DARE's random pruning. Default 0. The draw is deterministic in Go (PCG,
	// peft.NewRand) and differs from torch.bernoulli's: the same seed gives the same adapter here,
	// never the one PEFT draws.
	Seed uint64 `json:"seed"`
}

// DefaultConfig returns the svd type with the rank of the largest input, no clamping, sign
// election by total, seed 0; Weights must be set.
func DefaultConfig() Config { return Config{Type: SVD, MajoritySign: SignTotal} }

// Validate checks the configuration on its own, naming the first field that is wrong (Combine
// also checks that there is one weight per adapter).
func (c Config) Validate() error {
	if !slices.Contains(Types(), c.Type) {
		return fmt.Errorf("combine: unknown combination type %q (known: %v)", c.Type, Types())
	}
	if len(c.Weights) == 0 {
		return errors.New("combine: weights: give one weight per adapter")
	}
	for i, w := range c.Weights {
		if math.IsNaN(w) || math.IsInf(w, 0) {
			return fmt.Errorf("combine: weights[%d] = %g is not a finite number", i, w)
		}
	}
	if c.SVDRank < 0 {
		return fmt.Errorf("combine: svd_rank must be ≥ 0 (0: the largest input rank), got %d", c.SVDRank)
	}
	if c.SVDRank > 0 && !c.Type.isSVD() {
		return fmt.Errorf("combine: svd_rank is used by the svd types only, not %s", c.Type)
	}
	if !(c.SVDClamp >= 0 && c.SVDClamp <= 1) {
		return fmt.Errorf("combine: svd_clamp must be in (0, 1] (0: no clamping), got %g", c.SVDClamp)
	}
	if c.SVDClamp > 0 && !c.Type.isSVD() {
		return fmt.Errorf("combine: svd_clamp is used by the svd types only, not %s", c.Type)
	}
	prunes := c.Type.rule().prunes()
	switch {
	case prunes && c.Density == 0:
		return fmt.Errorf("combine: density is required by %s: the fraction of entries kept, in (0, 1]", c.Type)
	case prunes && !(c.Density > 0 && c.Density <= 1):
		return fmt.Errorf("combine: density must be in (0, 1], got %g", c.Density)
	case !prunes && c.Density != 0:
		return fmt.Errorf("combine: density is used by the pruning types (ties, dare_linear, dare_ties, magnitude_prune and their _svd forms), not %s", c.Type)
	}
	if c.MajoritySign != "" && c.MajoritySign != SignTotal && c.MajoritySign != SignFrequency {
		return fmt.Errorf("combine: majority_sign_method must be %q or %q, got %q", SignTotal, SignFrequency, c.MajoritySign)
	}
	return nil
}

// Layer is one adapted linear layer of a LoRA adapter, in PyTorch's layout as PEFT stores it.
type Layer struct {
	// Path is the layer's module path, "model.layers.0.self_attn.q_proj".
	Path string
	// In, Out and Rank are the layer's input and output sizes and its LoRA rank.
	In, Out, Rank int
	// A is lora_A.weight [Rank, In] and B is lora_B.weight [Out, Rank], row-major.
	A, B []float32
	// Scale is s in ΔW = s·B·A: lora_alpha/r, or lora_alpha/√r with rsLoRA.
	Scale float64
}

// Delta returns the layer's update s·B·A [Out, In], row-major, computed in float64.
func (l *Layer) Delta() []float64 {
	d := make([]float64, l.Out*l.In)
	for o := range l.Out {
		row := d[o*l.In : (o+1)*l.In]
		for k := range l.Rank {
			b := l.Scale * float64(l.B[o*l.Rank+k])
			for i, a := range l.A[k*l.In : (k+1)*l.In] {
				row[i] += b * float64(a)
			}
		}
	}
	return d
}

// check errs unless the factors have the sizes the layer declares; where names the adapter.
func (l *Layer) check(where string) error {
	switch {
	case l.Path == "":
		return fmt.Errorf("combine: %s: a layer has no path", where)
	case l.In <= 0 || l.Out <= 0 || l.Rank <= 0:
		return fmt.Errorf("combine: %s: layer %s has sizes in=%d out=%d rank=%d, all must be > 0", where, l.Path, l.In, l.Out, l.Rank)
	case len(l.A) != l.Rank*l.In:
		return fmt.Errorf("combine: %s: layer %s: A has %d values, [rank %d, in %d] needs %d", where, l.Path, len(l.A), l.Rank, l.In, l.Rank*l.In)
	case len(l.B) != l.Out*l.Rank:
		return fmt.Errorf("combine: %s: layer %s: B has %d values, [out %d, rank %d] needs %d", where, l.Path, len(l.B), l.Out, l.Rank, l.Out*l.Rank)
	case math.IsNaN(l.Scale) || math.IsInf(l.Scale, 0):
		return fmt.Errorf("combine: %s: layer %s: scale %g is not a finite number", where, l.Path, l.Scale)
	}
	return nil
}

// Adapter is a LoRA adapter in memory: its layers and what selects them.
type Adapter struct {
	// Name names the adapter in errors (ReadFolder sets its folder).
	Name string
	// Rank is PEFT's rank of the adapter, which sets the new rank: r, or the largest of r and the
	// rank_pattern values. 0 means the largest rank of its layers.
	Rank int
	// Targets is the adapter's target_modules.
	Targets peft.Targets
	// Layers are the adapted layers, each path once.
	Layers []Layer
}

// rank returns the adapter's rank for PEFT's rank rules.
func (a *Adapter) rank() int {
	if a.Rank > 0 {
		return a.Rank
	}
	r := 0
	for i := range a.Layers {
		r = max(r, a.Layers[i].Rank)
	}
	return r
}

// Layer returns the layer at path, or nil.
func (a *Adapter) Layer(path string) *Layer {
	for i := range a.Layers {
		if a.Layers[i].Path == path {
			return &a.Layers[i]
		}
	}
	return nil
}

// name is the adapter's name for errors.
func (a *Adapter) name(i int) string {
	if a.Name != "" {
		return a.Name
	}
	return fmt.Sprintf("adapter %d", i)
}

// Combine returns the adapter that PEFT's add_weighted_adapter(adapters, cfg.Weights,
// combination_type=cfg.Type, …) makes: one layer for each layer some input adapts (in the order
// they first appear), each combined from the inputs that adapt it, with scale 1.
//
// The new rank is PEFT's: for cat the sum of the adapters' ranks (Adapter.Rank; a layer that some
// adapters leave alone is padded with zero rows of A and columns of B, as in PEFT); for the svd
// types cfg.SVDRank, or the largest adapter rank; for the others the adapters' common rank (they
// must all have the same one, as PEFT requires, and so must every layer in all adapters that adapt
// it: PEFT fails there inside torch.stack). A layer whose rank differs from the new rank (an input
// with rank_pattern) keeps its rank, which the result's Rank does not cover: WriteFolder writes it
// to rank_pattern and alpha_pattern.
//
// Arithmetic is float64, rounded to float32 at the end (PEFT computes in the adapter's dtype,
// float32 usually), and the SVD is gonum's, in float64 (torch.linalg.svd, on the float32 update,
// in PEFT): results agree with PEFT's to float32 rounding, save DARE's random masks and, for
// svd_clamp, SVD sign choices that may differ from LAPACK's as torch calls it.
func Combine(adapters []*Adapter, cfg Config) (*Adapter, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if len(adapters) == 0 {
		return nil, errors.New("combine: no adapters to combine")
	}
	if len(cfg.Weights) != len(adapters) {
		return nil, fmt.Errorf("combine: %d weights for %d adapters: give one weight per adapter", len(cfg.Weights), len(adapters))
	}
	var order []string
	seen := map[string]bool{}
	for i, a := range adapters {
		if a == nil || len(a.Layers) == 0 {
			return nil, fmt.Errorf("combine: adapter %d has no layers", i)
		}
		paths := map[string]bool{}
		for j := range a.Layers {
			l := &a.Layers[j]
			if err := l.check(a.name(i)); err != nil {
				return nil, err
			}
			if paths[l.Path] {
				return nil, fmt.Errorf("combine: %s: layer %s appears twice", a.name(i), l.Path)
			}
			paths[l.Path] = true
			if !seen[l.Path] {
				seen[l.Path] = true
				order = append(order, l.Path)
			}
		}
	}
	typ := cfg.Type
	if len(adapters) == 1 {
		typ = Linear // PEFT: "if there is only one adapter, we can only use linear merging"
	}
	ranks := make([]int, len(adapters))
	for i, a := range adapters {
		ranks[i] = a.rank()
	}
	var newRank int
	switch {
	case typ == Cat:
		for _, r := range ranks {
			newRank += r
		}
	case typ.isSVD():
		newRank = cfg.SVDRank
		if newRank == 0 {
			newRank = slices.Max(ranks)
		}
	default:
		for i, r := range ranks {
			if r != ranks[0] {
				return nil, fmt.Errorf("combine: %s needs adapters of one rank: %s has rank %d, %s has %d (use cat or an svd type to combine different ranks)",
					typ, adapters[0].name(0), ranks[0], adapters[i].name(i), r)
			}
		}
		newRank = ranks[0]
	}
	out := &Adapter{Rank: newRank, Targets: unionTargets(adapters), Layers: make([]Layer, 0, len(order))}
	var err error
	m := merger{rule: typ.rule(), density: cfg.Density, sign: cfg.MajoritySign, rng: peft.NewRand(cfg.Seed)}
	for _, path := range order {
		var in []*Layer
		var weights []float64
		var names []string
		for i, a := range adapters {
			if l := a.Layer(path); l != nil {
				in = append(in, l)
				weights = append(weights, cfg.Weights[i])
				names = append(names, a.name(i))
			}
		}
		for j, l := range in[1:] {
			if l.In != in[0].In || l.Out != in[0].Out {
				return nil, fmt.Errorf("combine: layer %s is [out %d, in %d] in %s but [out %d, in %d] in %s: adapters of different base models?",
					path, in[0].Out, in[0].In, names[0], l.Out, l.In, names[j+1])
			}
		}
		var layer Layer
		switch {
		case typ == Cat:
			layer = concatenate(in, weights, newRank)
		case typ.isSVD():
			if layer, err = m.decomposed(in, weights, newRank, cfg.SVDClamp); err != nil {
				return nil, err
			}
		default:
			for j, l := range in[1:] {
				if l.Rank != in[0].Rank {
					return nil, fmt.Errorf("combine: %s needs layers of one rank: %s has rank %d in %s, %d in %s (rank_pattern)",
						typ, path, in[0].Rank, names[0], l.Rank, names[j+1])
				}
			}
			layer = m.factorwise(in, weights)
		}
		out.Layers = append(out.Layers, layer)
	}
	return out, nil
}

// concatenate is cat: A = concat(wᵢ·sᵢ·Aᵢ) by rows, B = concat(Bᵢ) by columns, zero-padded to
// rank.
func concatenate(in []*Layer, weights []float64, rank int) Layer {
	first := in[0]
	out := Layer{Path: first.Path, In: first.In, Out: first.Out, Rank: rank, Scale: 1,
		A: make([]float32, rank*first.In), B: make([]float32, first.Out*rank)}
	row := 0
	for i, l := range in {
		f := weights[i] * l.Scale
		for k := range l.Rank {
			for j, a := range l.A[k*l.In : (k+1)*l.In] {
				out.A[(row+k)*l.In+j] = float32(f * float64(a))
			}
			for o := range l.Out {
				out.B[o*rank+row+k] = l.B[o*l.Rank+k]
			}
		}
		row += l.Rank
	}
	return out
}

// factorwise is the linear family: the A's merged with weights ±√|wᵢ·sᵢ| (the sign on A alone),
// the B's with √|wᵢ·sᵢ|.
func (m *merger) factorwise(in []*Layer, weights []float64) Layer {
	wa, wb := make([]float64, len(in)), make([]float64, len(in))
	as, bs := make([][]float64, len(in)), make([][]float64, len(in))
	for i, l := range in {
		ws := weights[i] * l.Scale
		wb[i] = math.Sqrt(math.Abs(ws))
		wa[i] = wb[i]
		if ws < 0 {
			wa[i] = -wa[i]
		}
		as[i], bs[i] = float64s(l.A), float64s(l.B)
	}
	first := in[0]
	return Layer{Path: first.Path, In: first.In, Out: first.Out, Rank: first.Rank, Scale: 1,
		A: float32s(m.merge(as, wa)), B: float32s(m.merge(bs, wb))}
}

// decomposed is the svd family: ΔW = merge(ΔWᵢ, wᵢ·sᵢ), cut to rank by SVD.
func (m *merger) decomposed(in []*Layer, weights []float64, rank int, clamp float64) (Layer, error) {
	first := in[0]
	if rank > min(first.In, first.Out) {
		return Layer{}, fmt.Errorf("combine: svd rank %d exceeds min(in %d, out %d) of layer %s", rank, first.In, first.Out, first.Path)
	}
	deltas, ws := make([][]float64, len(in)), make([]float64, len(in))
	for i, l := range in {
		deltas[i], ws[i] = l.Delta(), weights[i]*l.Scale
	}
	b, a, err := truncatedSVD(m.merge(deltas, ws), first.Out, first.In, rank)
	if err != nil {
		return Layer{}, fmt.Errorf("combine: layer %s: %w", first.Path, err)
	}
	if clamp > 0 {
		clampQuantile(b, a, clamp)
	}
	return Layer{Path: first.Path, In: first.In, Out: first.Out, Rank: rank, Scale: 1, A: float32s(a), B: float32s(b)}, nil
}

// unionTargets is PEFT's target_modules of the result: the union of the name lists, or the
// patterns joined as "(p₁)|(p₂)|…" (one pattern when all are the same, "all-linear" included).
// Mixing lists and patterns, which PEFT refuses, gives the list of the adapted layers' paths,
// which selects the same layers.
func unionTargets(adapters []*Adapter) peft.Targets {
	var names, patterns []string
	for _, a := range adapters {
		names = append(names, a.Targets.Names...)
		if a.Targets.Pattern != "" && !slices.Contains(patterns, a.Targets.Pattern) {
			patterns = append(patterns, a.Targets.Pattern)
		}
	}
	switch {
	case len(patterns) == 0 && len(names) > 0:
		slices.Sort(names)
		return peft.TargetNames(slices.Compact(names)...)
	case len(patterns) == 1 && len(names) == 0:
		return peft.TargetPattern(patterns[0])
	case len(names) == 0 && !slices.Contains(patterns, peft.AllLinear):
		joined := make([]string, len(patterns))
		for i, p := range patterns {
			joined[i] = "(" + p + ")"
		}
		return peft.TargetPattern(strings.Join(joined, "|"))
	}
	var paths []string
	for _, a := range adapters {
		for _, l := range a.Layers {
			paths = append(paths, l.Path)
		}
	}
	slices.Sort(paths)
	return peft.TargetNames(slices.Compact(paths)...)
}

func float64s(v []float32) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = float64(x)
	}
	return out
}

func float32s(v []float64) []float32 {
	out := make([]float32, len(v))
	for i, x := range v {
		out[i] = float32(x)
	}
	return out
}
