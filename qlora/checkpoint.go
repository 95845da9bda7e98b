package qlora

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"strings"
	"testing/fstest"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/bnb"
	"peft/peft/files"
	"peft/peft/safetensors"
)

// Dequantized reads the Hugging Face model folder fsys whose weights may be in bitsandbytes'
// 4-bit layout (as SaveQuantized, examples/quantize or Hugging Face's 4-bit save write them) and
// returns the same folder with every 4-bit weight dequantized exactly (bnb.Quantized.Dequantize)
// to F32, in one model.safetensors, and the 4-bit weights by layer path. Load the folder with the
// model family's loader (llama.LoadPretrainedFS, say) and the model runs with no method applied;
// pass the 4-bit weights to QLoRA.UsePrequantized to train on exactly this quantized model.
// Tensors stored in full precision are kept as they are; every other file (config.json,
// tokenizer.json, ...) is the folder's own.
//
// A 4-bit weight whose quant state disagrees with its tensors, or a companion tensor without its
// quant state, is an error that names it (see bnb.FromTensors).
func Dequantized(fsys fs.FS) (fs.FS, Prequantized, error) {
	shards, err := files.Shards(fsys)
	if err != nil {
		return nil, nil, fmt.Errorf("qlora: %w", err)
	}
	var plain []safetensors.Tensor
	pre := Prequantized{}
	for _, file := range shards {
		data, err := files.Read(fsys, file, files.Any)
		if err != nil {
			return nil, nil, fmt.Errorf("qlora: %w", err)
		}
		f, err := safetensors.Parse(data)
		if err != nil {
			return nil, nil, fmt.Errorf("qlora: %s: %w", file, err)
		}
		quantized, others, err := bnb.ReadFile(f)
		if err != nil {
			return nil, nil, fmt.Errorf("qlora: %s: %w", file, err)
		}
		plain = append(plain, others...)
		for name, q := range quantized {
			plain = append(plain, safetensors.FromFloat32(name, q.Shape, q.Dequantize()))
			pre[strings.TrimSuffix(name, ".weight")] = q
		}
	}
	encoded, err := safetensors.Encode(plain, map[string]string{"format": "pt"})
	if err != nil {
		return nil, nil, fmt.Errorf("qlora: %w", err)
	}
	hidden := map[string]bool{files.IndexFile: true}
	for _, file := range shards {
		hidden[file] = true
	}
	return dequantizedFS{fsys: fsys, weights: encoded, hidden: hidden}, pre, nil
}

// dequantizedFS is a model folder with its weight files replaced by one model.safetensors.
type dequantizedFS struct {
	fsys    fs.FS
	weights []byte
	hidden  map[string]bool
}

// Open opens name: the dequantized weights for model.safetensors, nothing for the shards and
// their index, the folder's own file otherwise.
func (d dequantizedFS) Open(name string) (fs.File, error) {
	if name == "model.safetensors" {
		return fstest.MapFS{name: &fstest.MapFile{Data: d.weights, Mode: 0o444}}.Open(name)
	}
	if d.hidden[name] {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	return d.fsys.Open(name)
}

// SaveQuantized writes the QLoRA model m, whose configuration is cfg (a llama.Config, say), as a
// Hugging Face folder in bitsandbytes' 4-bit layout: model.safetensors holds every quantized layer X as
// X.weight and its companions (bnb.Quantized.Tensors documents them) and every other variable
// of the base model in F32 under its Hugging Face name ([out, in] for linear weights);
// config.json is cfg.HFConfig's with a quantization_config that Hugging Face transformers reads
// ("quant_method": "bitsandbytes", "load_in_4bit": true, the quant type, double quantization and
// compute dtype; linear layers left in full precision are listed in llm_int8_skip_modules). The
// adapter is not included (save it with m.Save); after a requantized merge the merged weights
// are written. Files named in copyFiles are copied from from (tokenizer files, say). The files
// are replaced as one change (atomicfile.WriteFiles), while nothing else uses the model
// (Model.WithExclusive).
func SaveQuantized(dir string, cfg peft.HFModelConfig, m *peft.Model, from fs.FS, copyFiles ...string) error {
	return m.WithExclusive(func() error { return saveQuantized(dir, cfg, m, from, copyFiles) })
}

// saveQuantized is SaveQuantized with the model to itself.
func saveQuantized(dir string, cfg peft.HFModelConfig, m *peft.Model, from fs.FS, copyFiles []string) error {
	q, ok := m.Method().(*QLoRA)
	if !ok {
		return fmt.Errorf("qlora.SaveQuantized: the model's method is %T, not QLoRA", m.Method())
	}
	if q.merged == MergeDequantized {
		return errors.New("qlora.SaveQuantized: the model is merged into float32 weights: export it with its family's SaveHF (llama.SaveHF), or unmerge")
	}
	ctx := m.Context()
	var out []safetensors.Tensor
	for _, v := range m.Layout().BaseVariables {
		if ql := q.quantFor(v); ql != nil {
			parts, err := ql.q.Tensors(ql.layer.Path + ".weight")
			if err != nil {
				return fmt.Errorf("qlora.SaveQuantized: %w", err)
			}
			out = append(out, parts...)
			continue
		}
		current := ctx.GetVariableByScopeAndName(v.Scope(), v.Name())
		if current == nil {
			return fmt.Errorf("qlora.SaveQuantized: variable %s no longer exists", v.ScopeAndName())
		}
		name, transposed, err := peft.HFName(current)
		if err != nil {
			return err
		}
		values, err := peft.Float32s(current)
		if err != nil {
			return fmt.Errorf("qlora.SaveQuantized: %w", err)
		}
		dims := current.Shape().Dimensions
		if transposed {
			values, dims = peft.Transpose(values, dims[0], dims[1]), []int{dims[1], dims[0]}
		}
		out = append(out, safetensors.FromFloat32(name, dims, values))
	}
	var skip []string
	for _, layer := range m.Layout().Linears {
		if q.quant[layer.Path] == nil {
			skip = append(skip, layer.Path)
		}
	}
	configJSON, err := hfConfigJSON(cfg, q.cfg, skip)
	if err != nil {
		return err
	}
	if err := peft.WriteModelFolder(dir, out, configJSON, from, copyFiles...); err != nil {
		return fmt.Errorf("qlora.SaveQuantized: %w", err)
	}
	return nil
}

// quantFor returns the quantized layer whose float32 weights v was, or nil.
func (l *QLoRA) quantFor(v *context.Variable) *quantLayer {
	if v.Name() != "weights" {
		return nil
	}
	for _, ql := range l.quantOrder {
		if v.Scope() == ql.layer.WeightsScope() {
			return ql
		}
	}
	return nil
}

// hfConfigJSON is config.json for cfg with the quantization recorded as transformers'
// BitsAndBytesConfig writes it.
func hfConfigJSON(cfg peft.HFModelConfig, qc Config, skip []string) ([]byte, error) {
	fields, err := cfg.HFConfig()
	if err != nil {
		return nil, err
	}
	fields["quantization_config"] = map[string]any{
		"quant_method":              "bitsandbytes",
		"load_in_4bit":              true,
		"load_in_8bit":              false,
		"bnb_4bit_quant_type":       string(qc.QuantType),
		"bnb_4bit_use_double_quant": qc.DoubleQuant,
		"bnb_4bit_compute_dtype":    qc.ComputeDType,
		"bnb_4bit_quant_storage":    "uint8",
		"llm_int8_skip_modules":     skip,
	}
	return peft.ConfigJSON(fields)
}

// MergeReport is what merging changed in the model's outputs on a probe batch.
type MergeReport struct {
	// Mode is how the update was merged.
	Mode MergeMode
	// MaxAbsChange and MeanAbsChange are the largest and the mean |after − before| over every
	// float32 output value.
	MaxAbsChange, MeanAbsChange float64
	// Values is the number of output values compared.
	Values int
}

// String prints the report on one line.
func (r MergeReport) String() string {
	return fmt.Sprintf("merge %s: output change max %.3g, mean %.3g over %d values", r.Mode, r.MaxAbsChange, r.MeanAbsChange, r.Values)
}

// Merge merges the QLoRA update of m with mode (through m.Merge, so compiled graphs follow) and
// reports how much m's outputs on the probe inputs changed: about float32 rounding for
// MergeDequantized, the cost of re-quantizing for MergeRequantized. Unmerge with m.Unmerge.
func Merge(m *peft.Model, mode MergeMode, probe ...*tensors.Tensor) (MergeReport, error) {
	q, ok := m.Method().(*QLoRA)
	if !ok {
		return MergeReport{}, fmt.Errorf("qlora.Merge: the model's method is %T, not QLoRA", m.Method())
	}
	if len(probe) == 0 {
		return MergeReport{}, errors.New("qlora.Merge: give the inputs of a probe batch to measure the change on")
	}
	if q.Merged() {
		return MergeReport{}, fmt.Errorf("qlora.Merge: already merged (%s)", q.merged)
	}
	if err := q.SetMergeMode(mode); err != nil {
		return MergeReport{}, err
	}
	before, err := m.Call(probe...)
	if err != nil {
		return MergeReport{}, err
	}
	if err := m.Merge(); err != nil {
		return MergeReport{}, err
	}
	after, err := m.Call(probe...)
	if err != nil {
		return MergeReport{}, err
	}
	report := MergeReport{Mode: mode}
	var sum float64
	for i := range before {
		if before[i].DType() != dtypes.Float32 {
			continue
		}
		b := tensors.MustCopyFlatData[float32](before[i])
		a := tensors.MustCopyFlatData[float32](after[i])
		for k := range b {
			d := math.Abs(float64(a[k]) - float64(b[k]))
			report.MaxAbsChange = math.Max(report.MaxAbsChange, d)
			sum += d
		}
		report.Values += len(b)
	}
	if report.Values > 0 {
		report.MeanAbsChange = sum / float64(report.Values)
	}
	return report, nil
}
