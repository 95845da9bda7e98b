// Package qlora implements QLoRA (Dettmers et al. 2023): the selected linear layers of a loaded
// model are quantized in place to bitsandbytes' 4-bit format (package peft/bnb: NF4 by default,
// blocks of 64, double-quantized scales), and LoRA trains on top:
//
//	y = x·dequant(Q) + b + s·(dropout(x)·A)·B,   s = Alpha/Rank (or Alpha/√Rank with rsLoRA)
//
// Only A [in, r] and B [r, out] train; B starts at zero, so a fresh model computes exactly what the
// quantized base computes (bit for bit the base with its weights replaced by their host-side
// dequantization).
//
// # Memory
//
// Init quantizes each selected layer's float32 weights on the host, stores the packed codes and
// the scales as frozen variables beside the layer (scope <layer>/qlora: "packed" uint8
// [(n+1)/2], "absmax" float32 [blocks] or, with double quantization, "absmax" uint8 [blocks],
// "nested_absmax" float32 [⌈blocks/256⌉] and "offset" float32 scalar, n = in·out), and deletes
// the layer's float32 "weights" variable from the context, so its memory is released:
// LinearLayer.Weights returns nil afterwards. The quantized variables are never trainable, so the
// optimizer keeps no state for them. Each forward pass dequantizes the weights inside the graph
// (bnb.DequantizeGraph: a table lookup per packed byte and one multiply per value, then a
// transpose to this SDK's [in, out] layout) to the compute dtype, float32 or bfloat16.
//
// Because peft.Linear creates its "weights" variable whenever a graph is built, a graph built
// after Init re-creates an empty placeholder for each quantized layer; the QLoRA hook deletes it
// again before anything reads it (it never gets a value, so it costs no memory).
//
// # Order of the quantized values
//
// Quantization follows PyTorch's layout, so that the bytes are those of a Hugging Face 4-bit
// checkpoint: the weight is transposed to [out, in] and flattened row-major before it is cut
// into blocks.
//
// # Checkpoints
//
// SaveQuantized writes the quantized model as a Hugging Face folder in bitsandbytes' layout
// (bnb.Quantized.Tensors documents every tensor's dtype and shape); Dequantized turns such a
// folder (or any checkpoint) into one the model family's loader reads (llama.LoadPretrainedFS),
// dequantizing 4-bit weights exactly, and returns the quantized weights so that UsePrequantized
// makes QLoRA adopt them instead of quantizing again. Neither knows a model family: config.json
// comes from the model's peft.HFModelConfig. Model.Save and Load handle the adapter (A, B and the modules to save), as
// for LoRA.
//
// # Merging
//
// Merge offers two modes (SetMergeMode, or the Merge function, which also reports the change in
// outputs on a probe batch): MergeDequantized (default) replaces each quantized layer by a
// float32 copy dequant(Q) + s·A·B, exact but full-size; MergeRequantized quantizes dequant(Q) +
// s·A·B again, which keeps the memory at 4 bits but rounds the update. Unmerge restores the
// quantized weights and the adapter exactly.
package qlora

import (
	"fmt"
	"math"
	"slices"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/lora"
	"peft/peft"
	"peft/peft/bnb"
)

// Compute dtypes for Config.ComputeDType.
const (
	// Float32 dequantizes to float32 and multiplies in float32 (default).
	Float32 = "float32"
	// BFloat16 dequantizes to bfloat16 and runs the base matmul in bfloat16 (the input is
	// rounded to bfloat16, the output converted back); the LoRA path stays in float32.
	BFloat16 = "bfloat16"
)

// Config configures QLoRA: LoRA's options (embedded, with LoRA's JSON names and meaning) plus the
// quantization. Start from DefaultConfig or FromLoRA.
type Config struct {
	lora.Config
	// QuantType is the 4-bit type: "nf4" (default) or "fp4".
	QuantType bnb.QuantType `json:"bnb_4bit_quant_type"`
	// BlockSize is the number of weights sharing one scale: a power of two from 32 to 4096.
	// Default 64.
	BlockSize int `json:"bnb_4bit_blocksize"`
	// DoubleQuant quantizes the scales to 8 bits (default true).
	DoubleQuant bool `json:"bnb_4bit_use_double_quant"`
	// ComputeDType is what the weights are dequantized to for the matmul: Float32 (default) or
	// BFloat16.
	ComputeDType string `json:"bnb_4bit_compute_dtype"`
	// QuantizeModules selects the layers to quantize (peft.Targets semantics). Default
	// peft.AllLinear: every linear layer except output heads, as Hugging Face's 4-bit loading
	// keeps the head in full precision.
	QuantizeModules peft.Targets `json:"quantize_modules"`
}

// DefaultConfig returns LoRA's defaults (rank 8, alpha 8, Kaiming init) with LoRA on every linear
// layer but the head, as the QLoRA paper trains it, and NF4 with blocks of 64, double
// quantization, float32 compute, quantizing every linear layer but the head.
func DefaultConfig() Config {
	c := lora.DefaultConfig()
	c.TargetModules = peft.TargetPattern(peft.AllLinear)
	return FromLoRA(c)
}

// FromLoRA returns the QLoRA configuration that trains the given LoRA configuration on a base
// quantized with the defaults: switching a program from LoRA to QLoRA is
// qlora.New(qlora.FromLoRA(cfg)) instead of lora.New(cfg).
func FromLoRA(c lora.Config) Config {
	o := bnb.DefaultOptions()
	return Config{Config: c, QuantType: o.Type, BlockSize: o.BlockSize, DoubleQuant: o.DoubleQuant,
		ComputeDType: Float32, QuantizeModules: peft.TargetPattern(peft.AllLinear)}
}

// Options returns the quantization options of the configuration.
func (c Config) Options() bnb.Options {
	return bnb.Options{Type: c.QuantType, BlockSize: c.BlockSize, DoubleQuant: c.DoubleQuant}
}

// Validate checks the configuration, naming the first field that is wrong.
func (c Config) Validate() error {
	if err := c.Config.Validate(); err != nil {
		return fmt.Errorf("qlora: %w", err)
	}
	if _, err := bnb.Code(c.QuantType); err != nil {
		return fmt.Errorf("qlora: bnb_4bit_quant_type: unknown quant type %q (want %q or %q)", c.QuantType, bnb.NF4, bnb.FP4)
	}
	if b := c.BlockSize; b < 32 || b > 4096 || b&(b-1) != 0 {
		return fmt.Errorf("qlora: bnb_4bit_blocksize must be a power of two from 32 to 4096, got %d", b)
	}
	if c.ComputeDType != Float32 && c.ComputeDType != BFloat16 {
		return fmt.Errorf("qlora: bnb_4bit_compute_dtype must be %q or %q, got %q", Float32, BFloat16, c.ComputeDType)
	}
	if err := c.QuantizeModules.Validate(); err != nil {
		return fmt.Errorf("qlora: quantize_modules: %w", err)
	}
	return nil
}

// MergeMode says what Merge does.
type MergeMode string

const (
	// MergeDequantized replaces every quantized layer by a float32 copy dequant(Q) + s·A·B: no
	// rounding beyond float32's, at full-precision memory (default).
	MergeDequantized MergeMode = "dequantized"
	// MergeRequantized quantizes dequant(Q) + s·A·B again with the same options: 4-bit memory,
	// but the update is rounded (Merge reports how much the outputs change).
	MergeRequantized MergeMode = "requantized"
)

// QLoRA is the QLoRA method. It implements peft.Method, peft.LinearHook and peft.Merger.
type QLoRA struct {
	cfg        Config
	pre        Prequantized
	lora       *lora.LoRA // the adapters, exactly as package lora makes them
	layout     *peft.Layout
	quant      map[string]*quantLayer // by layer path
	quantOrder []*quantLayer
	mergeMode  MergeMode
	merged     MergeMode        // "" when not merged
	plain      peft.WeightMerge // the merge of the LoRA targets that are not quantized
}

// quantLayer is one quantized layer.
type quantLayer struct {
	layer   *peft.LinearLayer
	q       *bnb.Quantized // the stored weights, [out, in] order
	layout  bnb.Layout
	packed  *context.Variable
	absmax  *context.Variable
	nested  *context.Variable // double quantization only
	offset  *context.Variable // double quantization only
	saved   *bnb.Quantized    // the weights before a requantized merge
	weights *context.Variable // the float32 copy of a dequantized merge
}

// Prequantized holds 4-bit weights read from a checkpoint, by layer path
// ("model.layers.0.self_attn.q_proj"), in PyTorch's [out, in] order (Dequantized returns them).
type Prequantized map[string]*bnb.Quantized

// New returns QLoRA with cfg, or an error naming what is wrong with it.
func New(cfg Config) (*QLoRA, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	adapters, err := lora.New(cfg.Config)
	if err != nil {
		return nil, fmt.Errorf("qlora: %w", err)
	}
	return &QLoRA{cfg: cfg, lora: adapters, mergeMode: MergeDequantized}, nil
}

// UsePrequantized makes Init adopt these quantized weights for the layers it quantizes instead of
// quantizing the model's float weights, which must be their exact dequantization (as
// loading the folder Dequantized returns gives them): double-quantized scales cannot be recovered from dequantized
// values, so re-quantizing would not give the same model. Their options must be the
// configuration's. Layers Init does not quantize ignore their entry. Call it before NewModel.
func (l *QLoRA) UsePrequantized(p Prequantized) { l.pre = p }

// Name implements peft.Method.
func (l *QLoRA) Name() string { return "qlora" }

// Config implements peft.Method.
func (l *QLoRA) Config() any { return l.cfg }

// Init implements peft.Method: it quantizes the selected layers (deleting their float32 weights)
// and creates A and B for the LoRA targets. Everything that can fail is checked before the
// context changes.
func (l *QLoRA) Init(ctx *context.Context, layout *peft.Layout) error {
	toQuantize, err := l.cfg.QuantizeModules.Select(layout)
	if err != nil {
		return fmt.Errorf("qlora: quantize_modules: %w", err)
	}
	modules, err := peft.ModulesToSave(layout, l.cfg.ModulesToSave)
	if err != nil {
		return fmt.Errorf("qlora: %w", err)
	}
	for _, layer := range toQuantize {
		for _, v := range modules {
			if v.Scope() == layer.WeightsScope() && v.Name() == "weights" {
				return fmt.Errorf("qlora: modules_to_save trains %s in full, but quantize_modules quantizes it: leave it out of one of them", layer.Path)
			}
		}
	}

	// Quantize every selected layer on the host first.
	opts := l.cfg.Options()
	l.quant = map[string]*quantLayer{}
	l.quantOrder = nil
	for _, layer := range toQuantize {
		w := layer.Weights(ctx)
		if w == nil {
			return fmt.Errorf("qlora: layer %s has no float32 weights to quantize (is it quantized already? build a fresh context for each QLoRA model)", layer.Path)
		}
		values, err := peft.Float32s(w)
		if err != nil {
			return fmt.Errorf("qlora: %s: %w", layer.Path, err)
		}
		torchOrder := peft.Transpose(values, layer.In, layer.Out) // [out, in]
		var q *bnb.Quantized
		if pre := l.pre[layer.Path]; pre != nil {
			if err := checkPrequantized(pre, layer, opts, torchOrder); err != nil {
				return err
			}
			q = pre
		} else if q, err = bnb.Quantize(torchOrder, []int{layer.Out, layer.In}, opts); err != nil {
			return fmt.Errorf("qlora: quantizing %s: %w", layer.Path, err)
		}
		scope := ctx.InAbsPath(layer.Scope).In("qlora")
		for _, name := range []string{"packed", "absmax", "nested_absmax", "offset"} {
			if scope.GetVariableByScopeAndName(scope.Scope(), name) != nil {
				return fmt.Errorf("qlora: %s already holds quantized weights (%s/%s): build a fresh context for each QLoRA model", layer.Path, scope.Scope(), name)
			}
		}
		ql := &quantLayer{layer: layer, q: q, layout: q.Layout()}
		l.quant[layer.Path] = ql
		l.quantOrder = append(l.quantOrder, ql)
	}

	// LoRA, exactly as package lora makes it (same seeds, same order); DoRA's magnitudes start
	// from the weights the model computes with, dequantized where quantized.
	l.lora.SetBaseWeights(func(ctx *context.Context, layer *peft.LinearLayer) ([]float32, error) {
		if ql := l.quant[layer.Path]; ql != nil {
			return peft.Transpose(ql.q.Dequantize(), layer.Out, layer.In), nil
		}
		return peft.Float32s(layer.Weights(ctx))
	})
	if err := l.lora.Init(ctx, layout); err != nil {
		return err // peft.NewModel names the method
	}
	l.layout = layout

	// Store the quantized weights as frozen variables and release the float32 ones.
	for _, ql := range l.quantOrder {
		scope := ctx.InAbsPath(ql.layer.Scope).In("qlora").Checked(false)
		ql.createVariables(scope)
		if err := ctx.DeleteVariable(ql.layer.WeightsScope(), "weights"); err != nil {
			return fmt.Errorf("qlora: releasing the float32 weights of %s: %w", ql.layer.Path, err)
		}
	}
	return nil
}

// checkPrequantized checks that a checkpoint's quantized weights fit the layer and the
// configuration and are what the model's float weights were loaded from.
func checkPrequantized(pre *bnb.Quantized, layer *peft.LinearLayer, opts bnb.Options, torchOrder []float32) error {
	if err := pre.Validate(); err != nil {
		return fmt.Errorf("qlora: prequantized %s: %w", layer.Path, err)
	}
	if !slices.Equal(pre.Shape, []int{layer.Out, layer.In}) {
		return fmt.Errorf("qlora: prequantized %s has shape %v, the layer is [out=%d, in=%d]", layer.Path, pre.Shape, layer.Out, layer.In)
	}
	if pre.Options() != opts {
		return fmt.Errorf("qlora: prequantized %s uses %+v but the configuration says %+v: set bnb_4bit_quant_type, bnb_4bit_blocksize and bnb_4bit_use_double_quant to the checkpoint's",
			layer.Path, pre.Options(), opts)
	}
	for i, v := range pre.Dequantize() {
		if math.Float32bits(v) != math.Float32bits(torchOrder[i]) {
			return fmt.Errorf("qlora: prequantized %s does not dequantize to the model's weights (value %d: %v, the model has %v): load the model from the folder qlora.Dequantized returns",
				layer.Path, i, v, torchOrder[i])
		}
	}
	return nil
}

// createVariables stores ql.q as frozen variables in scope.
func (ql *quantLayer) createVariables(scope *context.Context) {
	q := ql.q
	ql.packed = scope.VariableWithValue("packed", tensors.FromFlatDataAndDimensions(slices.Clone(q.Packed), len(q.Packed)))
	if q.Nested != nil {
		ql.absmax = scope.VariableWithValue("absmax", tensors.FromFlatDataAndDimensions(slices.Clone(q.Nested.Codes), len(q.Nested.Codes)))
		ql.nested = scope.VariableWithValue("nested_absmax", tensors.FromFlatDataAndDimensions(slices.Clone(q.Nested.Absmax), len(q.Nested.Absmax)))
		ql.offset = scope.VariableWithValue("offset", tensors.FromScalar(q.Nested.Offset))
	} else {
		ql.absmax = scope.VariableWithValue("absmax", tensors.FromFlatDataAndDimensions(slices.Clone(q.Absmax), len(q.Absmax)))
	}
	for _, v := range ql.variables() {
		v.SetTrainable(false)
	}
}

// setValues replaces the stored weights with q (same options and shape).
func (ql *quantLayer) setValues(q *bnb.Quantized) error {
	if err := ql.packed.SetValue(tensors.FromFlatDataAndDimensions(slices.Clone(q.Packed), len(q.Packed))); err != nil {
		return err
	}
	var err error
	if q.Nested != nil {
		err = ql.absmax.SetValue(tensors.FromFlatDataAndDimensions(slices.Clone(q.Nested.Codes), len(q.Nested.Codes)))
		if err == nil {
			err = ql.nested.SetValue(tensors.FromFlatDataAndDimensions(slices.Clone(q.Nested.Absmax), len(q.Nested.Absmax)))
		}
		if err == nil {
			err = ql.offset.SetValue(tensors.FromScalar(q.Nested.Offset))
		}
	} else {
		err = ql.absmax.SetValue(tensors.FromFlatDataAndDimensions(slices.Clone(q.Absmax), len(q.Absmax)))
	}
	if err != nil {
		return err
	}
	ql.q = q
	return nil
}

// variables lists the layer's quantized variables.
func (ql *quantLayer) variables() []*context.Variable {
	vars := []*context.Variable{ql.packed, ql.absmax}
	if ql.nested != nil {
		vars = append(vars, ql.nested, ql.offset)
	}
	return vars
}

// Targets lists the paths of the layers LoRA adapts, in model order.
func (l *QLoRA) Targets() []string { return l.lora.Targets() }

// QuantizedLayers lists the paths of the quantized layers, in model order.
func (l *QLoRA) QuantizedLayers() []string {
	paths := make([]string, len(l.quantOrder))
	for i, ql := range l.quantOrder {
		paths[i] = ql.layer.Path
	}
	return paths
}

// Quantized returns the stored 4-bit weights of the layer at path ([out, in] order), or nil if it
// is not quantized. The value is shared: do not modify it.
func (l *QLoRA) Quantized(path string) *bnb.Quantized {
	if ql := l.quant[path]; ql != nil {
		return ql.q
	}
	return nil
}

// QuantizedVariables lists the frozen variables holding the quantized weights, in model order.
func (l *QLoRA) QuantizedVariables() []*context.Variable {
	var vars []*context.Variable
	for _, ql := range l.quantOrder {
		vars = append(vars, ql.variables()...)
	}
	return vars
}

// QuantizedParams returns the number of weights stored in 4 bits. peft.Model.Report counts the
// base variables that still exist, so its "all params" leaves these out.
func (l *QLoRA) QuantizedParams() int64 {
	var n int64
	for _, ql := range l.quantOrder {
		n += int64(ql.layer.In) * int64(ql.layer.Out)
	}
	return n
}

// QuantizedBytes returns the bytes the quantized variables hold.
func (l *QLoRA) QuantizedBytes() int64 {
	var n int64
	for _, v := range l.QuantizedVariables() {
		n += int64(v.Shape().Memory())
	}
	return n
}

// Trainable implements peft.Method: LoRA's A and B of every target, and the modules to save.
// The quantized weights never train.
func (l *QLoRA) Trainable(ctx *context.Context) []peft.TrainableVariable {
	return l.lora.Trainable(ctx)
}

// State implements peft.Method: what Trainable lists (the adapter; the quantized base is saved
// with SaveQuantized).
func (l *QLoRA) State(ctx *context.Context) []*context.Variable {
	return peft.VariablesOf(l.Trainable(ctx))
}

// Linear implements peft.LinearHook: the quantized base output x·dequant(Q) + b on quantized
// layers (layer.Base elsewhere, and on every layer while merged into float32 copies), plus
// s·(dropout(x)·A)·B on LoRA targets while not merged (with DoRA, lora.LoRA.Adapt's rescaling
// over the dequantized weights: QDoRA).
func (l *QLoRA) Linear(ctx *context.Context, layer *peft.LinearLayer, x *graph.Node) *graph.Node {
	var y, w *graph.Node
	if ql := l.quant[layer.Path]; ql != nil && l.merged != MergeDequantized {
		// peft.Linear re-created an empty "weights" placeholder before calling us: remove it
		// before the executor would initialize it.
		if w := layer.Weights(ctx); w != nil && !w.HasValue() {
			if err := ctx.DeleteVariable(layer.WeightsScope(), "weights"); err != nil {
				panic(err)
			}
		}
		w = ql.dequantized(x.Graph())
		y = l.quantizedLinear(ctx, ql, x, w)
	} else {
		y = layer.Base(ctx, x)
	}
	if l.merged != "" {
		return y
	}
	return l.lora.Adapt(ctx, layer, x, y, w)
}

// dequantized returns the layer's weights [in, out] dequantized in the graph, in float32.
func (ql *quantLayer) dequantized(g *graph.Graph) *graph.Node {
	nodes := bnb.Nodes{Packed: ql.packed.ValueGraph(g), Absmax: ql.absmax.ValueGraph(g)}
	if ql.nested != nil {
		nodes.NestedAbsmax = ql.nested.ValueGraph(g)
		nodes.Offset = ql.offset.ValueGraph(g)
	}
	flat := bnb.DequantizeGraph(ql.layout, nodes) // [out·in], PyTorch order
	return graph.Transpose(graph.Reshape(flat, ql.layer.Out, ql.layer.In), 0, 1)
}

// quantizedLinear computes x·w + b in the compute dtype, w = dequant(Q) [in, out].
func (l *QLoRA) quantizedLinear(ctx *context.Context, ql *quantLayer, x, w *graph.Node) *graph.Node {
	if l.cfg.ComputeDType != BFloat16 {
		return ql.layer.Apply(ctx, x, w)
	}
	y := peft.MatMulLast(graph.ConvertDType(x, dtypes.BFloat16), graph.ConvertDType(w, dtypes.BFloat16))
	y = graph.ConvertDType(y, x.DType())
	if b := ql.layer.Biases(ctx); b != nil {
		y = graph.Add(y, graph.ExpandLeftToRank(b.ValueGraph(x.Graph()), y.Rank()))
	}
	return y
}

// Delta returns the LoRA update s·A·B ([in, out], row-major) of the layer at path.
func (l *QLoRA) Delta(path string) ([]float32, error) {
	d, err := l.lora.Delta(path)
	if err != nil {
		return nil, fmt.Errorf("qlora: %w", err)
	}
	return d, nil
}

// SetMergeMode chooses what Merge (and peft.Model.Merge) does next: MergeDequantized (the
// default) or MergeRequantized.
func (l *QLoRA) SetMergeMode(mode MergeMode) error {
	if mode != MergeDequantized && mode != MergeRequantized {
		return fmt.Errorf("qlora: unknown merge mode %q (want %q or %q)", mode, MergeDequantized, MergeRequantized)
	}
	l.mergeMode = mode
	return nil
}

// MergedMode returns how the update is merged, or "" when it is not.
func (l *QLoRA) MergedMode() MergeMode { return l.merged }

// Merge implements peft.Merger with the mode SetMergeMode chose. Every new weight is computed
// before anything changes, so a failure leaves the model unmerged.
func (l *QLoRA) Merge(ctx *context.Context) error {
	if l.merged != "" {
		return fmt.Errorf("qlora: already merged (%s)", l.merged)
	}
	adapted := map[string]bool{}
	for _, path := range l.lora.Targets() {
		adapted[path] = true
	}
	// Quantized layers: dequant(Q) + s·A·B (DoRA: rescaled), as a float32 copy or quantized again.
	merged := make([][]float32, len(l.quantOrder))
	requantized := make([]*bnb.Quantized, len(l.quantOrder))
	for i, ql := range l.quantOrder {
		w := peft.Transpose(ql.q.Dequantize(), ql.layer.Out, ql.layer.In) // [in, out]
		if adapted[ql.layer.Path] {
			var err error
			if w, err = l.lora.MergedWeights(ql.layer.Path, w); err != nil {
				return err
			}
		}
		merged[i] = w
		if l.mergeMode == MergeRequantized {
			q, err := bnb.Quantize(peft.Transpose(w, ql.layer.In, ql.layer.Out), []int{ql.layer.Out, ql.layer.In}, ql.q.Options())
			if err != nil {
				return fmt.Errorf("qlora: re-quantizing %s: %w", ql.layer.Path, err)
			}
			requantized[i] = q
		}
	}

	// Non-quantized LoRA targets: W + s·A·B (DoRA: rescaled), all or nothing, W kept to unmerge
	// exactly.
	var plainLayers []*peft.LinearLayer
	for _, path := range l.lora.Targets() {
		if l.quant[path] == nil {
			plainLayers = append(plainLayers, l.layout.Linear(path))
		}
	}
	if err := l.plain.Replace(ctx, plainLayers, func(i int, w, _ []float32) ([]float32, []float32, error) {
		w, err := l.lora.MergedWeights(plainLayers[i].Path, w)
		return w, nil, err
	}); err != nil {
		return fmt.Errorf("qlora: %w", err)
	}
	for i, ql := range l.quantOrder {
		if l.mergeMode == MergeRequantized {
			ql.saved = ql.q
			if err := ql.setValues(requantized[i]); err != nil {
				return err
			}
			continue
		}
		if err := ctx.DeleteVariable(ql.layer.WeightsScope(), "weights"); err != nil { // a stray placeholder
			return err
		}
		ql.weights = peft.NewVariable(ctx.InAbsPath(ql.layer.WeightsScope()), "weights", merged[i], ql.layer.In, ql.layer.Out)
		ql.weights.SetTrainable(false)
	}
	l.merged = l.mergeMode
	return nil
}

// Unmerge implements peft.Merger: the quantized weights, the float32 weights of non-quantized
// targets and the adapter path come back exactly as they were.
func (l *QLoRA) Unmerge(ctx *context.Context) error {
	if l.merged == "" {
		return fmt.Errorf("qlora: not merged")
	}
	if err := l.plain.Unmerge(ctx); err != nil {
		return fmt.Errorf("qlora: %w", err)
	}
	for _, ql := range l.quantOrder {
		if ql.saved != nil {
			if err := ql.setValues(ql.saved); err != nil {
				return err
			}
			ql.saved = nil
		}
		if ql.weights != nil {
			if err := ctx.DeleteVariable(ql.layer.WeightsScope(), "weights"); err != nil {
				return err
			}
			ql.weights = nil
		}
	}
	l.merged = ""
	return nil
}

// Merged implements peft.Merger.
func (l *QLoRA) Merged() bool { return l.merged != "" }
