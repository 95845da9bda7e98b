package peft

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft/atomicfile"
	"peft/peft/files"
	"peft/peft/safetensors"
)

// Hugging Face PEFT's adapter folder (what PeftModel.save_pretrained writes, PEFT v0.20):
// adapter_config.json (sorted keys, indent 2) and adapter_model.safetensors (metadata
// {"format": "pt"}, keys base_model.model.<module path>.<suffix>, PyTorch's [out, in] layout, no
// adapter name in any key). The adapter named "default" sits in the folder itself, any other in a
// sub-folder <name>/.
const (
	// AdapterConfigFile is PEFT's adapter configuration.
	AdapterConfigFile = "adapter_config.json"
	// AdapterWeightsFile is PEFT's adapter tensors.
	AdapterWeightsFile = "adapter_model.safetensors"
	// adapterPickleFile is PEFT's pickle fallback, which we never read (arbitrary code on load).
	adapterPickleFile = "adapter_model.bin"
	// metadataRecord is the safetensors __metadata__ key under which Save keeps what PEFT does not
	// read (our configuration with its seed, the base model's fingerprint, the SHA-256 of the
	// adapter_config.json written with the tensors). PEFT and transformers ignore metadata.
	metadataRecord = "peft_go"
)

// Key prefixes of PEFT's adapter files.
const (
	// PEFTPrefix starts the keys of LoRA-style adapters, whose PeftModel wraps the model twice
	// (PeftModel.base_model is a LoraModel whose .model is the transformers model).
	PEFTPrefix = "base_model.model."
	// PromptLearningPrefix starts the modules-to-save keys of prompt-learning adapters, whose
	// PeftModel wraps the model once.
	PromptLearningPrefix = "base_model."
)

// maxConfigBytes bounds the configuration files we read (adapter_config.json, peft_config.json):
// real ones are a few kilobytes.
const maxConfigBytes = 16 << 20

// TaskType is Hugging Face PEFT's task_type: what the model's head does.
type TaskType string

// The task types our models declare (SetTask).
const (
	TaskCausalLM TaskType = "CAUSAL_LM" // next-token prediction (AutoModelForCausalLM)
	TaskSeqCls   TaskType = "SEQ_CLS"   // sequence classification (AutoModelForSequenceClassification)
)

// SetTask declares, from inside a model function, which task the model's outputs serve. Save
// writes it as the adapter's task_type, and Load refuses an adapter saved for another task.
func SetTask(ctx *context.Context, g *graph.Graph, task TaskType) {
	if a := activeFor(ctx, g); a != nil && a.trace != nil {
		a.trace.Task = task
	}
}

// PEFTFormat is implemented by methods that Hugging Face PEFT also has (LoRA, AdaLoRA, QLoRA's
// adapter, prompt tuning): Model.Save writes them as a PEFT adapter folder that PEFT, vLLM and
// Ollama load, and Model.Load reads folders PEFT wrote.
type PEFTFormat interface {
	Method
	// PEFTType is PEFT's peft_type: "LORA", "ADALORA", "PROMPT_TUNING".
	PEFTType() string
	// PEFTConfig returns the method's fields of adapter_config.json under PEFT's names, with PEFT's
	// values (PEFT's defaults for the fields the method does not use). Save adds the fields every
	// adapter has (peft_type, task_type, base_model_name_or_path, revision, inference_mode,
	// auto_mapping).
	PEFTConfig(ctx *context.Context) (map[string]any, error)
	// CheckPEFTConfig returns an error naming the first field of a PEFT configuration that the
	// method cannot load: one it does not implement, or a value that differs from its own
	// configuration in a way that changes what the adapter computes.
	CheckPEFTConfig(fields *PEFTFields) error
	// PEFTTensors returns the method's state under PEFT's keys, in PyTorch's layout.
	PEFTTensors(ctx *context.Context) ([]safetensors.Tensor, error)
	// PEFTValues reads the method's state from a PEFT file: one value per State variable, in
	// State's order. It takes what it reads with file.Take, which checks names and shapes; what it
	// leaves in the file is an error (PEFT would silently drop it).
	PEFTValues(ctx *context.Context, fields *PEFTFields, file *PEFTTensorFile) ([]*tensors.Tensor, error)
}

// commonPEFTFields are the adapter_config.json fields of every PEFT config class, which the core
// writes and checks.
var commonPEFTFields = []string{"peft_type", "task_type", "base_model_name_or_path", "revision",
	"inference_mode", "auto_mapping", "peft_version"}

// PEFTFields is a parsed adapter_config.json. Method packages read it field by field, so that the
// fields nobody read can be reported, and every error names the file and the field.
type PEFTFields struct {
	raw    map[string]json.RawMessage
	data   []byte
	used   map[string]bool
	source string
}

// ParsePEFTFields parses the content of an adapter_config.json; source names it in errors.
func ParsePEFTFields(data []byte, source string) (*PEFTFields, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil || raw == nil {
		if err == nil {
			err = errors.New("not a JSON object")
		}
		return nil, fmt.Errorf("peft: %s: %w", source, err)
	}
	f := &PEFTFields{raw: raw, data: data, used: map[string]bool{}, source: source}
	for _, key := range commonPEFTFields {
		f.used[key] = true
	}
	if !f.Has("peft_type") {
		return nil, fmt.Errorf("peft: %s: peft_type is required (a string such as \"LORA\")", source)
	}
	if err := f.Get("peft_type", new(string)); err != nil || f.PEFTType() == "" {
		return nil, fmt.Errorf("peft: %s: peft_type must be a non-empty string such as \"LORA\", got %s", source, truncateText(string(raw["peft_type"]), 80))
	}
	return f, nil
}

// ReadPromptLearningFields reads the fields every prompt-learning adapter_config.json (prompt and
// prefix tuning) shares and that change what it computes: modules_to_save, and
// num_transformer_submodules, which must be 1 (decoder-only models; 2 is an encoder-decoder's).
func ReadPromptLearningFields(fields *PEFTFields) (modulesToSave []string, err error) {
	if err := fields.Get("modules_to_save", &modulesToSave); err != nil {
		return nil, err
	}
	if err := fields.Refuse("num_transformer_submodules", "1"); err != nil {
		return nil, err
	}
	return modulesToSave, nil
}

// ReadPEFTFields reads dir's adapter_config.json.
func ReadPEFTFields(dir string) (*PEFTFields, error) {
	path := filepath.Join(dir, AdapterConfigFile)
	data, err := readBounded(path, maxConfigBytes)
	if err != nil {
		return nil, err
	}
	return ParsePEFTFields(data, path)
}

// Source is the file the fields were read from.
func (f *PEFTFields) Source() string { return f.source }

// PEFTType returns peft_type.
func (f *PEFTFields) PEFTType() string {
	var s string
	_ = json.Unmarshal(f.raw["peft_type"], &s)
	return s
}

// Has reports whether key is present with a value other than null.
func (f *PEFTFields) Has(key string) bool {
	raw, ok := f.raw[key]
	return ok && string(bytes.TrimSpace(raw)) != "null"
}

// Get decodes key into dst when it is present and not null, leaving dst as it is otherwise (the
// field's default). An error names the file and the field.
func (f *PEFTFields) Get(key string, dst any) error {
	f.used[key] = true
	if !f.Has(key) {
		return nil
	}
	if err := json.Unmarshal(f.raw[key], dst); err != nil {
		return fmt.Errorf("peft: %s: field %q: %w", f.source, key, err)
	}
	return nil
}

// Refuse errs if key holds a value other than null or one of allowed (JSON texts such as
// "false", "\"none\""): fields that change what an adapter computes and that we do not implement.
func (f *PEFTFields) Refuse(key string, allowed ...string) error {
	f.used[key] = true
	if !f.Has(key) {
		return nil
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, f.raw[key]); err != nil {
		return fmt.Errorf("peft: %s: field %q: %w", f.source, key, err)
	}
	if slices.Contains(allowed, compact.String()) {
		return nil
	}
	return fmt.Errorf("peft: %s: field %q = %s changes what the adapter computes and is not supported by this SDK",
		f.source, key, truncateText(compact.String(), 200))
}

// Ignore marks fields that do not change what a trained adapter computes (initialization,
// training-time options), so they are not reported as unknown.
func (f *PEFTFields) Ignore(keys ...string) {
	for _, key := range keys {
		f.used[key] = true
	}
}

// Unknown lists, sorted, the fields present that nothing read or ignored: fields of a newer PEFT
// or of another tool, which Load reports in one log line.
func (f *PEFTFields) Unknown() []string {
	var keys []string
	for key := range f.raw {
		if !f.used[key] {
			keys = append(keys, key)
		}
	}
	sort.Strings(keys)
	return keys
}

// PEFTTensorFile is an adapter_model.safetensors being read: Take hands out tensors by key,
// checking their shapes, and remembers what was taken, so that what is left can be reported.
type PEFTTensorFile struct {
	file   *safetensors.File
	taken  map[string]bool
	source string
}

func newPEFTTensorFile(file *safetensors.File, source string) *PEFTTensorFile {
	return &PEFTTensorFile{file: file, taken: map[string]bool{}, source: source}
}

// Take returns the tensor key as float32 values (F32, F16 and BF16 are read), checking that its
// shape is dims. Missing tensors and other shapes are errors naming the tensor and the file.
func (t *PEFTTensorFile) Take(key string, dims ...int) ([]float32, error) {
	st, ok := t.file.Get(key)
	if !ok {
		return nil, fmt.Errorf("peft: tensor %s is missing from %s", key, t.source)
	}
	if !slices.Equal(st.Shape, dims) {
		return nil, fmt.Errorf("peft: tensor %s has shape %v in %s, the model expects %v", key, st.Shape, t.source, dims)
	}
	values, err := st.Float32s()
	if err != nil {
		return nil, fmt.Errorf("peft: tensor %s in %s: %w", key, t.source, err)
	}
	t.taken[key] = true
	return values, nil
}

// left lists, sorted, the tensors nothing took.
func (t *PEFTTensorFile) left() []string {
	var names []string
	for _, st := range t.file.Tensors {
		if !t.taken[st.Name] {
			names = append(names, st.Name)
		}
	}
	sort.Strings(names)
	return names
}

// HFName names a variable of a model built with this package's building blocks the way Hugging
// Face names its tensor: <scope>/embeddings → <path>.weight; <scope>/dense/weights →
// <path>.weight, transposed to PyTorch's [out, in]; <scope>/dense/biases → <path>.bias;
// <scope>/weight (norms) → <path>.weight.
func HFName(v *context.Variable) (name string, transposed bool, err error) {
	scope := v.Scope()
	dense, isDense := strings.CutSuffix(scope, context.ScopeSeparator+"dense")
	switch {
	case v.Name() == "embeddings" || v.Name() == "weight":
		return ScopeToPath(scope) + ".weight", false, nil
	case isDense && v.Name() == "weights" && v.Shape().Rank() == 2:
		return ScopeToPath(dense) + ".weight", true, nil
	case isDense && v.Name() == "biases":
		return ScopeToPath(dense) + ".bias", false, nil
	}
	return "", false, fmt.Errorf("peft: no Hugging Face name for variable %s", v.ScopeAndName())
}

// HFTensors returns vars under their Hugging Face names (HFName) after prefix, in PyTorch's
// layout: the modules_to_save of an adapter file, or a whole model.
func HFTensors(prefix string, vars []*context.Variable) ([]safetensors.Tensor, error) {
	out := make([]safetensors.Tensor, 0, len(vars))
	for _, v := range vars {
		name, transposed, err := HFName(v)
		if err != nil {
			return nil, err
		}
		values, err := Float32s(v)
		if err != nil {
			return nil, fmt.Errorf("peft: reading %s: %w", v.ScopeAndName(), err)
		}
		dims := slices.Clone(v.Shape().Dimensions)
		if transposed {
			values = Transpose(values, dims[0], dims[1])
			dims[0], dims[1] = dims[1], dims[0]
		}
		out = append(out, safetensors.FromFloat32(prefix+name, dims, values))
	}
	return out, nil
}

// HFValues reads vars from file under their Hugging Face names after prefix: the inverse of
// HFTensors.
func HFValues(prefix string, vars []*context.Variable, file *PEFTTensorFile) ([]*tensors.Tensor, error) {
	out := make([]*tensors.Tensor, 0, len(vars))
	for _, v := range vars {
		name, transposed, err := HFName(v)
		if err != nil {
			return nil, err
		}
		dims := slices.Clone(v.Shape().Dimensions)
		if transposed {
			dims[0], dims[1] = dims[1], dims[0]
		}
		values, err := file.Take(prefix+name, dims...)
		if err != nil {
			return nil, err
		}
		if transposed {
			values = Transpose(values, dims[0], dims[1])
		}
		out = append(out, tensors.FromFlatDataAndDimensions(values, v.Shape().Dimensions...))
	}
	return out, nil
}

// Transpose returns the [cols, rows] transpose of the row-major [rows, cols] matrix v.
func Transpose[T any](v []T, rows, cols int) []T {
	out := make([]T, len(v))
	for r := range rows {
		for c := range cols {
			out[c*rows+r] = v[r*cols+c]
		}
	}
	return out
}

// encodePEFTConfig writes fields as PEFT does (json.dumps(indent=2, sort_keys=True)): keys
// sorted, two-space indent, no HTML escaping. Values that keep their own order (Patterns) keep it.
func encodePEFTConfig(fields map[string]any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(fields); err != nil {
		return nil, err
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil
}

// readBounded reads a regular file of at most limit bytes, refusing anything else before reading.
func readBounded(path string, limit int64) ([]byte, error) {
	f, info, err := openRegular(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if info.Size() > limit {
		return nil, fmt.Errorf("peft: %s is %d bytes, above the %d-byte limit for a configuration file", path, info.Size(), limit)
	}
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("peft: %s: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("peft: %s grew above the %d-byte limit while being read", path, limit)
	}
	return data, nil
}

// readMetadata reads the __metadata__ of a safetensors file from its header alone, checking the
// header's length against the file before reading it.
func readMetadata(path string) (map[string]string, error) {
	f, info, err := openRegular(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var prefix [8]byte
	if _, err := io.ReadFull(f, prefix[:]); err != nil {
		return nil, fmt.Errorf("peft: %s: %w", path, err)
	}
	n := binary.LittleEndian.Uint64(prefix[:])
	if n > uint64(info.Size()-8) || n > safetensors.MaxHeaderSize {
		return nil, fmt.Errorf("peft: %s: safetensors header length %d exceeds the file or the %d-byte limit", path, n, safetensors.MaxHeaderSize)
	}
	header := make([]byte, n)
	if _, err := io.ReadFull(f, header); err != nil {
		return nil, fmt.Errorf("peft: %s: %w", path, err)
	}
	var parsed struct {
		Metadata map[string]string `json:"__metadata__"`
	}
	if err := json.Unmarshal(header, &parsed); err != nil {
		return nil, fmt.Errorf("peft: %s: safetensors header: %w", path, err)
	}
	return parsed.Metadata, nil
}

// ListOrNull is names for a JSON list, or nil (null) when there are none: PEFT's form of
// optional lists such as modules_to_save.
func ListOrNull(names []string) any {
	if len(names) == 0 {
		return nil
	}
	return names
}

// checkRegular errs unless path is a regular file (after links), before anything opens it: opening
// a named pipe would block.
func checkRegular(path string) error {
	if err := files.Check(os.DirFS(filepath.Dir(path)), filepath.Base(path)); err != nil {
		return fmt.Errorf("peft: %s: %w", filepath.Dir(path), err)
	}
	return nil
}

// openRegular opens path for reading if it is a regular file, checked before opening and again on
// what was opened.
func openRegular(path string) (*os.File, os.FileInfo, error) {
	if err := checkRegular(path); err != nil {
		return nil, nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("peft: %w", err)
	}
	info, err := f.Stat()
	if err == nil && !info.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file", path)
	}
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("peft: %w", err)
	}
	return f, info, nil
}

func truncateText(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// Format is the layout of a saved folder.
type Format string

// The layouts Save writes and Load reads.
const (
	// FormatPEFT is Hugging Face PEFT's adapter folder (adapter_config.json,
	// adapter_model.safetensors): LoRA, AdaLoRA, QLoRA's adapter and prompt tuning.
	FormatPEFT Format = "peft"
	// FormatOwn is this SDK's folder (peft_config.json and a safetensors file), for the methods
	// PEFT does not have: bottleneck adapters (GoMLX variable names) and full fine-tuning (a
	// Hugging Face model folder: model.safetensors with Hugging Face names and config.json).
	FormatOwn Format = "own"
)

// FindAdapter locates the saved adapter in dir: dir itself when it holds one (either layout), the
// sub-folder name when name is given (PEFT keeps adapters other than "default" in <name>/), or
// the only sub-folder that holds one. It returns the folder and its layout.
func FindAdapter(dir, name string) (string, Format, error) {
	if name != "" {
		if name != filepath.Base(name) || name == "." || name == ".." {
			return "", "", fmt.Errorf("peft: adapter name %q is not a plain folder name", name)
		}
		if format, ok := folderFormat(dir); ok && name == "default" {
			return dir, format, nil // PEFT keeps the adapter named "default" in the folder itself
		}
		dir = filepath.Join(dir, name)
	}
	if format, ok := folderFormat(dir); ok {
		return dir, format, nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", "", fmt.Errorf("peft: no saved adapter in %s: %w", dir, err)
	}
	var found []string
	for _, e := range entries {
		if _, ok := folderFormat(filepath.Join(dir, e.Name())); ok && e.IsDir() {
			found = append(found, e.Name())
		}
	}
	switch len(found) {
	case 1:
		sub := filepath.Join(dir, found[0])
		format, _ := folderFormat(sub)
		return sub, format, nil
	case 0:
		return "", "", fmt.Errorf("peft: no saved adapter in %s: neither %s (Hugging Face PEFT) nor %s (this SDK's layout), nor a sub-folder holding one",
			dir, AdapterConfigFile, ConfigFile)
	}
	return "", "", fmt.Errorf("peft: %s holds several adapters (%s): name one (peft.AdapterName, or the sub-folder itself)",
		dir, strings.Join(found, ", "))
}

func folderFormat(dir string) (Format, bool) {
	// A save cut short after its commit is completed first (atomicfile.WriteFiles); if that
	// cannot be done here (a read-only folder), the files are read as they are and the
	// configuration's pin on its tensors catches a mix.
	_ = atomicfile.Complete(dir)
	if info, err := os.Stat(filepath.Join(dir, AdapterConfigFile)); err == nil && !info.IsDir() {
		return FormatPEFT, true
	}
	if info, err := os.Stat(filepath.Join(dir, ConfigFile)); err == nil && !info.IsDir() {
		return FormatOwn, true
	}
	return "", false
}
