package combine

import (
	"encoding/json"
	"fmt"
	"log"
	"path/filepath"
	"slices"
	"strings"

	"peft/lora"
	"peft/peft"
	"peft/peft/safetensors"
	"peft/qlora"
)

// Folder is a LoRA adapter with what its Hugging Face PEFT folder says besides the layers.
type Folder struct {
	Adapter
	// Dir is the folder the adapter was read from ("" for a combination not yet written).
	Dir string
	// Config is the adapter's LoRA configuration (lora.ParsePEFTConfig of its
	// adapter_config.json; for a combination, what WriteFolder writes).
	Config lora.Config
	// TaskType is task_type ("" when null).
	TaskType string
	// BaseModel is base_model_name_or_path ("" when null).
	BaseModel string
	// Fingerprint is the base model's fingerprint (peft.Model.BaseFingerprint) that this SDK
	// records in the adapters it saves, and Method the SDK method that saved it ("lora",
	// "qlora"); both "" for folders PEFT wrote. The fingerprint covers the base weights the method
	// does not save, so two are comparable when the same method saved the same modules_to_save:
	// combining refuses such adapters with different fingerprints, and adapters saved by
	// different methods (QLoRA's 4-bit base is not LoRA's float one). A combination keeps the
	// fingerprint and method of inputs that saved its modules_to_save, and WriteFolder records
	// them, so loading the combined adapter onto other base weights is refused as for any saved
	// adapter; without them (adapters from PEFT) it loads without that check.
	Fingerprint, Method string
	// methodConfig is the SDK configuration (JSON) of the input whose method the combination
	// keeps: QLoRA's quantization options come from it.
	methodConfig json.RawMessage
	// Modules are the tensors of the modules_to_save (Config.ModulesToSave), under their keys in
	// the file (base_model.model.<module path>.weight, .bias), in PyTorch's layout.
	Modules []safetensors.Tensor
}

// loraSuffixes are the keys of an adapted layer in a PEFT LoRA file.
const (
	suffixA = ".lora_A.weight"
	suffixB = ".lora_B.weight"
)

// ReadFolder reads a Hugging Face PEFT LoRA adapter folder (written by this SDK, QLoRA's
// included, or by PEFT; see peft.FindAdapter for sub-folders): its configuration, resolved per
// layer (rank_pattern, alpha_pattern, use_rslora), its lora_A and lora_B tensors (F32, F16 or
// BF16), checked against the configuration (ranks, target_modules), and its modules_to_save.
// Adapters that are not plain LoRA are refused: other peft_types, DoRA (PEFT's
// add_weighted_adapter has no rule for magnitudes), LoRA on embeddings, and what
// lora.ParsePEFTConfig refuses.
func ReadFolder(dir string) (*Folder, error) {
	saved, err := peft.ReadAdapter(dir)
	if err != nil {
		return nil, fmt.Errorf("combine: %w", err)
	}
	if saved.Format != peft.FormatPEFT {
		return nil, fmt.Errorf("combine: %s holds a %s state in this SDK's layout, not a LoRA adapter", saved.Dir, saved.Method)
	}
	fields := saved.Fields
	if got := fields.PEFTType(); got != "LORA" {
		return nil, fmt.Errorf("combine: %s: peft_type %s: only LORA adapters can be combined (as in PEFT)", fields.Source(), got)
	}
	cfg, err := lora.ParsePEFTConfig(fields)
	if err != nil {
		return nil, fmt.Errorf("combine: %w", err)
	}
	if cfg.UseDoRA {
		return nil, fmt.Errorf("combine: %s: use_dora: DoRA adapters cannot be combined (PEFT's add_weighted_adapter has no rule for their magnitudes)", fields.Source())
	}
	f := &Folder{Dir: saved.Dir, Config: cfg}
	f.Name, f.Targets, f.Rank = saved.Dir, cfg.TargetModules, cfg.Rank
	for _, p := range cfg.RankPattern {
		f.Rank = max(f.Rank, p.Value) // PEFT: max(config.r, *config.rank_pattern.values())
	}
	if err := fields.Get("task_type", &f.TaskType); err != nil {
		return nil, err
	}
	if err := fields.Get("base_model_name_or_path", &f.BaseModel); err != nil {
		return nil, err
	}
	weightsPath := filepath.Join(saved.Dir, peft.AdapterWeightsFile)
	file, err := safetensors.Read(weightsPath)
	if err != nil {
		return nil, fmt.Errorf("combine: %w", err)
	}
	f.Fingerprint, f.Method, f.methodConfig = saved.BaseFingerprint, saved.Method, saved.Config
	if err := f.readTensors(file, weightsPath); err != nil {
		return nil, err
	}
	if len(f.Layers) == 0 {
		return nil, fmt.Errorf("combine: %s has no lora_A/lora_B tensors", weightsPath)
	}
	return f, nil
}

// readTensors fills the layers and modules of f from file (source names it in errors).
func (f *Folder) readTensors(file *safetensors.File, source string) error {
	take := func(key string) (*safetensors.Tensor, []float32, error) {
		t, ok := file.Get(key)
		if !ok {
			return nil, nil, fmt.Errorf("combine: tensor %s is missing from %s", key, source)
		}
		if len(t.Shape) != 2 {
			return nil, nil, fmt.Errorf("combine: tensor %s has shape %v in %s, want a matrix", key, t.Shape, source)
		}
		values, err := t.Float32s()
		if err != nil {
			return nil, nil, fmt.Errorf("combine: tensor %s in %s: %w", key, source, err)
		}
		return t, values, nil
	}
	for _, t := range file.Tensors {
		key, ok := strings.CutPrefix(t.Name, peft.PEFTPrefix)
		if !ok {
			return fmt.Errorf("combine: tensor %s in %s does not start with %q: not a LoRA adapter file", t.Name, source, peft.PEFTPrefix)
		}
		if strings.HasSuffix(key, suffixB) {
			continue // read with its lora_A
		}
		path, isA := strings.CutSuffix(key, suffixA)
		if !isA {
			if strings.Contains(key, ".lora_") {
				return fmt.Errorf("combine: tensor %s in %s: only lora_A.weight and lora_B.weight can be combined (no DoRA, lora_bias or LoRA on embeddings)", t.Name, source)
			}
			if !f.savesModule(key) {
				return fmt.Errorf("combine: tensor %s in %s is neither a LoRA factor nor one of modules_to_save %q", t.Name, source, f.Config.ModulesToSave)
			}
			f.Modules = append(f.Modules, t)
			continue
		}
		ta, a, err := take(t.Name)
		if err != nil {
			return err
		}
		keyB := peft.PEFTPrefix + path + suffixB
		tb, b, err := take(keyB)
		if err != nil {
			return err
		}
		rank, _, scale := f.Config.Resolve(path)
		if ta.Shape[0] != rank || tb.Shape[1] != rank {
			return fmt.Errorf("combine: %s: tensors %s %v and %s %v disagree with rank %d (r, rank_pattern) of layer %s",
				source, t.Name, ta.Shape, keyB, tb.Shape, rank, path)
		}
		if !f.Config.TargetModules.Matches(&peft.LinearLayer{Path: path}) {
			return fmt.Errorf("combine: %s: tensor %s adapts %s, which target_modules %s do not select", source, t.Name, path, f.Config.TargetModules)
		}
		f.Layers = append(f.Layers, Layer{Path: path, In: ta.Shape[1], Out: tb.Shape[0], Rank: rank, A: a, B: b, Scale: scale})
	}
	return nil
}

// savesModule reports whether key (without the prefix) is a tensor of one of the modules to save.
func (f *Folder) savesModule(key string) bool {
	module := key[:max(strings.LastIndex(key, "."), 0)]
	for _, name := range f.Config.ModulesToSave {
		if module == name || strings.HasSuffix(module, "."+name) {
			return true
		}
	}
	return false
}

// CombineFolders combines adapters read by ReadFolder (Combine) into a Folder that WriteFolder
// writes. They must be adapters of one base model: the same task_type (null matches any),
// the same base fingerprint where this SDK recorded comparable ones (Folder.Fingerprint), the same shape for every layer that
// several adapt. Their modules_to_save are carried over unweighted; a module saved by two
// adapters cannot be combined and is refused, as PEFT refuses it. (PEFT gives the new adapter the
// first adapter's modules_to_save list with fresh copies of the base modules, losing the trained
// ones; here the trained ones are kept.) The other fields (lora_dropout, init_lora_weights,
// base_model_name_or_path) are the first adapter's, as PEFT copies its configuration.
func CombineFolders(folders []*Folder, cfg Config) (*Folder, error) {
	if len(folders) == 0 {
		return nil, fmt.Errorf("combine: no adapters to combine")
	}
	first := folders[0]
	out := &Folder{TaskType: first.TaskType, BaseModel: first.BaseModel}
	adapters := make([]*Adapter, len(folders))
	moduleOwner := map[string]string{}
	fingerprints := map[string]*Folder{} // by what the fingerprint leaves out: method, modules
	var method *Folder                   // the first input with a fingerprint
	for i, f := range folders {
		adapters[i] = &f.Adapter
		if out.TaskType == "" {
			out.TaskType = f.TaskType
		}
		if f.TaskType != "" && f.TaskType != out.TaskType {
			return nil, fmt.Errorf("combine: %s has task_type %s, %s has %s: adapters for different tasks cannot be combined",
				f.Dir, f.TaskType, folderOf(folders, out.TaskType), out.TaskType)
		}
		if f.Fingerprint != "" {
			if method == nil {
				method = f
			} else if f.Method != method.Method {
				return nil, fmt.Errorf("combine: %w: %s was saved by %s, %s by %s: adapters trained on different bases (QLoRA's is quantized to 4 bits) cannot be combined",
					peft.ErrOtherBase, method.Dir, method.Method, f.Dir, f.Method)
			}
			key := f.Method + fmt.Sprint(slices.Sorted(slices.Values(f.Config.ModulesToSave)))
			if other := fingerprints[key]; other == nil {
				fingerprints[key] = f
			} else if other.Fingerprint != f.Fingerprint {
				return nil, fmt.Errorf("combine: %w: %s was saved on a base model whose weights have fingerprint %.16s…, %s on one with %.16s…: adapters of different base models cannot be combined",
					peft.ErrOtherBase, f.Dir, f.Fingerprint, other.Dir, other.Fingerprint)
			}
		}
		for _, t := range f.Modules {
			if owner, found := moduleOwner[t.Name]; found {
				return nil, fmt.Errorf("combine: %s and %s both save %s (modules_to_save): modules saved by several adapters cannot be combined (PEFT refuses them too)",
					owner, f.Dir, t.Name)
			}
			moduleOwner[t.Name] = f.Dir
			out.Modules = append(out.Modules, t)
		}
		out.Config.ModulesToSave = append(out.Config.ModulesToSave, f.Config.ModulesToSave...)
	}
	combined, err := Combine(adapters, cfg)
	if err != nil {
		return nil, err
	}
	out.Adapter = *combined
	slices.Sort(out.Config.ModulesToSave)
	out.Config.ModulesToSave = slices.Compact(out.Config.ModulesToSave)
	// The fingerprint covers the base weights the adapter does not save: an input's holds for
	// the combination when it saved the same modules.
	if method != nil {
		if f := fingerprints[method.Method+fmt.Sprint(out.Config.ModulesToSave)]; f != nil {
			out.Fingerprint, out.Method, out.methodConfig = f.Fingerprint, f.Method, f.methodConfig
		} else {
			log.Printf("combine: no input saved modules_to_save %v, so the combination carries no base fingerprint: loading it onto other base weights will not be refused", out.Config.ModulesToSave)
		}
	}
	if out.Config, err = out.loraConfig(first.Config.Dropout, first.Config.InitA, out.Config.ModulesToSave); err != nil {
		return nil, err
	}
	return out, nil
}

func folderOf(folders []*Folder, task string) string {
	for _, f := range folders {
		if f.TaskType == task {
			return f.Dir
		}
	}
	return ""
}

// loraConfig is the LoRA configuration that selects f's layers with their ranks and scales
// without rsLoRA: r is f.Rank (the largest layer rank when 0), lora_alpha is r times the scale most
// layers share (1 for a combination), and rank_pattern and alpha_pattern name, by their full
// path, the layers whose rank or alpha (scale·rank) differ.
func (f *Folder) loraConfig(dropout float64, init string, modules []string) (lora.Config, error) {
	c := lora.DefaultConfig()
	c.Rank, c.Dropout, c.ModulesToSave, c.TargetModules = f.Adapter.rank(), dropout, modules, f.Targets
	if init != "" {
		c.InitA = init
	}
	if c.TargetModules.IsZero() {
		c.TargetModules = unionTargets([]*Adapter{&f.Adapter})
	}
	scales := map[float64]int{}
	for _, l := range f.Layers {
		scales[l.Scale]++
	}
	common := 0.0
	for s, n := range scales {
		if n > scales[common] || n == scales[common] && s < common {
			common = s
		}
	}
	c.Alpha = common * float64(c.Rank)
	for _, l := range f.Layers {
		if l.Rank != c.Rank {
			c.RankPattern = append(c.RankPattern, peft.Pattern[int]{Key: l.Path, Value: l.Rank})
		}
		if alpha := l.Scale * float64(l.Rank); alpha != c.Alpha {
			c.AlphaPattern = append(c.AlphaPattern, peft.Pattern[float64]{Key: l.Path, Value: alpha})
		}
	}
	if err := c.Validate(); err != nil {
		return lora.Config{}, fmt.Errorf("combine: the combined adapter's configuration: %w", err)
	}
	return c, nil
}

// WriteFolder writes f as a Hugging Face PEFT LoRA adapter folder (adapter_config.json with
// f.Config, f.TaskType and f.BaseModel; adapter_model.safetensors with the layers and
// f.Modules, metadata {"format": "pt"}) that PEFT, this SDK (peft.Model.Load,
// peft/methods.FromFolder) and examples/merge load like any adapter. The two files replace
// what dir held as one change (atomicfile.WriteFiles, as peft.Model.Save writes), so a write
// killed at any instant leaves the old adapter or the new. rank_pattern and alpha_pattern keys
// are full layer paths, which select the layer alone under every PEFT version's matching rule.
func WriteFolder(dir string, f *Folder) error {
	l, err := lora.New(f.Config)
	if err != nil {
		return fmt.Errorf("combine: %w", err)
	}
	fields, err := l.PEFTConfig(nil) // before Init: the configuration without resolved patterns
	if err != nil {
		return err
	}
	rankPattern, alphaPattern := peft.Patterns[int]{}, peft.Patterns[any]{}
	rankPattern = append(rankPattern, f.Config.RankPattern...)
	for _, p := range f.Config.AlphaPattern {
		alphaPattern = append(alphaPattern, peft.Pattern[any]{Key: p.Key, Value: lora.PEFTNumber(p.Value)})
	}
	fields["rank_pattern"], fields["alpha_pattern"] = rankPattern, alphaPattern
	tensors := make([]safetensors.Tensor, 0, 2*len(f.Layers)+len(f.Modules))
	for i := range f.Layers {
		layer := &f.Layers[i]
		if err := layer.check(dir); err != nil {
			return err
		}
		key := peft.PEFTPrefix + layer.Path
		tensors = append(tensors,
			safetensors.FromFloat32(key+suffixA, []int{layer.Rank, layer.In}, layer.A),
			safetensors.FromFloat32(key+suffixB, []int{layer.Out, layer.Rank}, layer.B))
	}
	a := peft.PEFTAdapter{PEFTType: l.PEFTType(), Fields: fields, Tensors: append(tensors, f.Modules...),
		Task: peft.TaskType(f.TaskType), BaseModel: f.BaseModel}
	if f.Fingerprint != "" {
		if a.Config, err = f.sdkConfig(); err != nil {
			return err
		}
		a.Method, a.BaseFingerprint = f.Method, f.Fingerprint
	}
	if err := peft.WritePEFTFolder(dir, a); err != nil {
		return fmt.Errorf("combine: %w", err)
	}
	return nil
}

// sdkConfig is the configuration this SDK records for f with its method: f.Config, for QLoRA
// with the quantization options of the input it took the method from.
func (f *Folder) sdkConfig() (json.RawMessage, error) {
	switch f.Method {
	case "lora":
		return json.Marshal(f.Config)
	case "qlora":
		var c qlora.Config
		if err := json.Unmarshal(f.methodConfig, &c); err != nil {
			return nil, fmt.Errorf("combine: the qlora configuration of %s: %w", f.Dir, err)
		}
		c.Config = f.Config
		return json.Marshal(c)
	}
	return nil, fmt.Errorf("combine: adapters saved by %s cannot be recorded", f.Method)
}

// CombineDirs reads the LoRA adapter folders dirs (ReadFolder), combines them with cfg
// (CombineFolders, Combine) and writes the result to out (WriteFolder), which may be one of dirs.
func CombineDirs(out string, dirs []string, cfg Config) (*Folder, error) {
	folders := make([]*Folder, len(dirs))
	for i, dir := range dirs {
		f, err := ReadFolder(dir)
		if err != nil {
			return nil, err
		}
		folders[i] = f
	}
	combined, err := CombineFolders(folders, cfg)
	if err != nil {
		return nil, err
	}
	if err := WriteFolder(out, combined); err != nil {
		return nil, err
	}
	combined.Dir = out
	return combined, nil
}
