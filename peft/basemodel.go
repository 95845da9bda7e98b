package peft

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"peft/peft/atomicfile"
	"peft/peft/safetensors"
	"reflect"
	"runtime"
	"sort"
	"strings"
	"sync"
	"weak"

	"github.com/gomlx/gomlx/pkg/ml/context"
)

// BaseModel says which pretrained model a context holds. Loaders record it (llama.LoadPretrained,
// llama.Init), and Save writes it with an adapter: NameOrPath as PEFT's base_model_name_or_path,
// Config as the config.json of the Hugging Face folder a full fine-tune is saved as.
type BaseModel struct {
	// NameOrPath is the folder or Hub id the model was loaded from (Hugging Face's
	// name_or_path), or "" when unknown.
	NameOrPath string `json:"name_or_path"`
	// Config is the model's config.json, or nil when unknown.
	Config json.RawMessage `json:"config,omitempty"`
}

// HFModelConfig is a model's configuration as the config.json of its Hugging Face folder holds
// it. Code that writes whole checkpoints without knowing the model family (qlora.SaveQuantized)
// takes one; llama.Config is one.
type HFModelConfig interface {
	// HFConfig returns config.json's fields, or an error if the configuration is invalid.
	HFConfig() (map[string]any, error)
}

// ConfigJSON encodes a config.json's fields as transformers writes them: sorted keys, indented
// by two spaces, a final newline.
func ConfigJSON(fields map[string]any) ([]byte, error) {
	data, err := json.MarshalIndent(fields, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// WriteModelFolder writes a Hugging Face model folder as one change (atomicfile.WriteFiles):
// model.safetensors with tensors (metadata {"format": "pt"}), config.json, and the files named
// in copyFiles read from from (tokenizer files, say; none when from is nil). The family's
// exports (llama.SaveHF, qlora.SaveQuantized) write through it.
func WriteModelFolder(dir string, tensors []safetensors.Tensor, config []byte, from fs.FS, copyFiles ...string) error {
	files, err := atomicfile.ReadFiles(from, copyFiles...)
	if err != nil {
		return err
	}
	weights, err := safetensors.Encode(tensors, map[string]string{"format": "pt"})
	if err != nil {
		return err
	}
	files = append(files, atomicfile.File{Name: ModelWeightsFile, Data: weights}, atomicfile.File{Name: ModelConfigFile, Data: config})
	return atomicfile.WriteFiles(dir, files)
}

// paramBaseModel is the context parameter (at the root scope) that holds the BaseModel.
const paramBaseModel = "peft_base_model"

// SetBaseModel records which pretrained model ctx holds. Call it after loading weights by other
// means, or to give the Hub id a saved adapter should name as its base.
func SetBaseModel(ctx *context.Context, base BaseModel) {
	ctx.InAbsPath(context.RootScope).SetParam(paramBaseModel, base)
}

// NameBaseModel sets the name or path of the base model recorded in ctx, keeping its config: the
// Hub id a saved adapter should name (base_model_name_or_path), or the name of an embedded model.
func NameBaseModel(ctx *context.Context, nameOrPath string) {
	base := BaseModelOf(ctx)
	base.NameOrPath = nameOrPath
	SetBaseModel(ctx, base)
}

// BaseModelOf returns what SetBaseModel recorded in ctx (the zero BaseModel if nothing was).
func BaseModelOf(ctx *context.Context) BaseModel {
	value, found := ctx.InAbsPath(context.RootScope).GetParam(paramBaseModel)
	if !found {
		return BaseModel{}
	}
	base, _ := value.(BaseModel)
	return base
}

// ErrOtherBase is returned (wrapped) by Load when an adapter was saved on a base model whose
// weights differ from the model's: AllowOtherBase applies it anyway.
var ErrOtherBase = errors.New("peft: the adapter was trained on another base model")

// castagnoli is CRC-32C, which amd64 and arm64 compute in hardware (several GB/s): the per-tensor
// checksum of the base-model fingerprint.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// variableDigests checksums each variable's bytes (CRC-32C), keyed by scope and name.
func variableDigests(vars []*context.Variable) (map[string]string, error) {
	digests := make(map[string]string, len(vars))
	for _, v := range vars {
		if !v.HasValue() {
			continue
		}
		value, err := v.Value()
		if err != nil {
			return nil, err
		}
		var sum uint32
		if err := value.ConstBytes(func(data []byte) { sum = crc32.Checksum(data, castagnoli) }); err != nil {
			return nil, err
		}
		digests[v.ScopeAndName()] = fmt.Sprintf("%s %v %08x", v.DType(), v.Shape().Dimensions, sum)
	}
	return digests, nil
}

// fingerprint combines the digests of the variables not saved into one SHA-256 (hex), or "" when
// nothing is left (full fine-tuning: the state is the whole model).
func fingerprint(digests map[string]string, saved map[string]bool) string {
	names := make([]string, 0, len(digests))
	for name := range digests {
		if !saved[name] {
			names = append(names, name)
		}
	}
	if len(names) == 0 {
		return ""
	}
	sort.Strings(names)
	h := sha256.New()
	for _, name := range names {
		fmt.Fprintf(h, "%s %s\n", name, digests[name])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// boundMethods maps each method value applied by NewModel to its model (weakly), so that one
// method value applied to two models is refused: it holds the variables of the first.
var boundMethods sync.Map // Method → binding

// binding is a method's entry in boundMethods: its model, or the zero binding while a NewModel
// applying it runs.
type binding struct{ model weak.Pointer[Model] }

// reserveMethod claims method for a NewModel about to apply it, atomically, and returns the
// function that releases the claim if NewModel fails. A method held by a live model, or claimed by
// a NewModel running concurrently, is an error.
func reserveMethod(method Method) (release func(), err error) {
	if method == nil || !reflect.TypeOf(method).Comparable() {
		return func() {}, nil
	}
	for {
		previous, loaded := boundMethods.LoadOrStore(method, binding{})
		if !loaded {
			return func() { boundMethods.CompareAndDelete(method, binding{}) }, nil
		}
		b := previous.(binding)
		switch {
		case b == binding{}:
			return nil, fmt.Errorf("peft.NewModel: this %s method value is being applied to another model right now: build a new method (with the same Config) for each model", method.Name())
		case b.model.Value() != nil:
			return nil, fmt.Errorf("peft.NewModel: this %s method value is already applied to another model, whose variables it holds: build a new method (with the same Config) for each model", method.Name())
		}
		if boundMethods.CompareAndSwap(method, previous, binding{}) { // its model is gone
			return func() { boundMethods.CompareAndDelete(method, binding{}) }, nil
		}
	}
}

// bindMethod records that method belongs to m, once NewModel has succeeded.
func bindMethod(method Method, m *Model) {
	if method == nil || !reflect.TypeOf(method).Comparable() {
		return
	}
	b := binding{weak.Make(m)}
	boundMethods.Store(method, b)
	// Forget the binding once the model is gone (unless another model took the method since).
	runtime.AddCleanup(m, func(method Method) { boundMethods.CompareAndDelete(method, b) }, method)
}

// paramModels is the context parameter (at the root scope) listing the models applied to the
// context, for CheckExport.
const paramModels = "peft_models"

// modelRegistry lists the models applied to one context, weakly.
type modelRegistry struct {
	mu     sync.Mutex
	models []weak.Pointer[Model]
}

func registerModel(ctx *context.Context, m *Model) {
	root := ctx.InAbsPath(context.RootScope)
	value, _ := root.GetParam(paramModels)
	reg, ok := value.(*modelRegistry)
	if !ok {
		reg = &modelRegistry{}
		root.SetParam(paramModels, reg)
	}
	reg.mu.Lock()
	defer reg.mu.Unlock()
	reg.models = append(reg.models, weak.Make(m))
}

// CheckExport returns an error if writing the base model's variables in ctx (as llama.SaveHF
// does) would drop a fine-tune: a model applied to ctx whose method keeps its update outside the
// base weights, such as an unmerged LoRA, bottleneck adapters or prompt tuning. Full fine-tuning
// and merged methods pass: the base weights are the fine-tuned model.
func CheckExport(ctx *context.Context) error {
	value, _ := ctx.InAbsPath(context.RootScope).GetParam(paramModels)
	reg, ok := value.(*modelRegistry)
	if !ok {
		return nil
	}
	reg.mu.Lock()
	defer reg.mu.Unlock()
	for _, wp := range reg.models {
		m := wp.Value()
		if m == nil || m.method == nil || m.isMerged() {
			continue
		}
		base := map[*context.Variable]bool{}
		for _, v := range m.layout.BaseVariables {
			base[v] = true
		}
		var outside []string
		for _, v := range m.method.State(m.ctx) {
			if !base[v] {
				outside = append(outside, v.ScopeAndName())
			}
		}
		if len(outside) == 0 {
			continue
		}
		if _, ok := m.method.(Merger); ok {
			return fmt.Errorf("peft: the %s fine-tune is not merged into the base weights (it is in %s…): writing the base model would drop it; call Model.Merge first, or save the adapter with Model.Save",
				m.method.Name(), outside[0])
		}
		return fmt.Errorf("peft: the %s fine-tune lives outside the base weights (%s…) and cannot be merged: writing the base model would drop it; save it with Model.Save and load it with the base model",
			m.method.Name(), strings.Join(outside[:min(2, len(outside))], ", "))
	}
	return nil
}
