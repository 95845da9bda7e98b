package peft

import (
	"encoding/json"
	"fmt"
	"log"
	"maps"
	"regexp"
	"slices"
	"strings"

	"github.com/gomlx/gomlx/pkg/ml/context"
)

// AllLinear is the special target pattern that selects every linear layer except output heads,
// as in Hugging Face PEFT.
const AllLinear = "all-linear"

// Targets selects linear layers by Hugging Face PEFT's rules:
//   - Pattern, a regular expression, must match a layer's whole path
//     ("model.layers.0.self_attn.q_proj"); the special pattern "all-linear" (AllLinear) selects
//     every linear layer except output heads;
//   - Names match a layer's path exactly or as a suffix after a dot ("q_proj" matches
//     "model.layers.0.self_attn.q_proj").
//
// Give one of the two. In JSON it is written as HF writes target_modules: a string for a pattern,
// a list for names.
type Targets struct {
	Pattern string
	Names   []string
}

// TargetNames selects layers whose path is one of names or ends with "."+name.
func TargetNames(names ...string) Targets { return Targets{Names: names} }

// TargetPattern selects layers whose whole path matches the regular expression pattern, or every
// non-head linear layer for AllLinear.
func TargetPattern(pattern string) Targets { return Targets{Pattern: pattern} }

// IsZero reports whether no target is set.
func (t Targets) IsZero() bool { return t.Pattern == "" && len(t.Names) == 0 }

// String describes the targets as a user wrote them.
func (t Targets) String() string {
	if t.Pattern != "" {
		return fmt.Sprintf("%q", t.Pattern)
	}
	return fmt.Sprintf("%q", t.Names)
}

// Validate checks that exactly one of Pattern and Names is set and that the pattern compiles.
func (t Targets) Validate() error {
	switch {
	case t.IsZero():
		return fmt.Errorf("no target modules given")
	case t.Pattern != "" && len(t.Names) > 0:
		return fmt.Errorf("target modules: give either a pattern or a list of names, not both")
	case t.Pattern != "" && t.Pattern != AllLinear:
		if _, err := regexp.Compile(t.Pattern); err != nil {
			return fmt.Errorf("target pattern %q is not a valid regular expression: %w", t.Pattern, err)
		}
	}
	for _, name := range t.Names {
		if name == "" {
			return fmt.Errorf("target modules: empty name in %q", t.Names)
		}
	}
	return nil
}

// Matches reports whether the layer is selected.
func (t Targets) Matches(layer *LinearLayer) bool {
	if t.Pattern == AllLinear {
		return !layer.Head
	}
	if t.Pattern != "" {
		re, err := regexp.Compile("^(?:" + t.Pattern + ")$")
		return err == nil && re.MatchString(layer.Path)
	}
	for _, name := range t.Names {
		if layer.Path == name || strings.HasSuffix(layer.Path, "."+name) {
			return true
		}
	}
	return false
}

// Select returns the layers of layout that t selects, in model order. Selecting nothing is an
// error that names the targets and lists the layers that exist.
func (t Targets) Select(layout *Layout) ([]*LinearLayer, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	var selected []*LinearLayer
	for _, layer := range layout.Linears {
		if t.Matches(layer) {
			selected = append(selected, layer)
		}
	}
	if len(selected) == 0 {
		return nil, fmt.Errorf("target modules %s match no linear layer of the model; %s", t, describeLinears(layout))
	}
	return selected, nil
}

// describeLinears says what layout's linear layers are called, briefly whatever the depth: their
// distinct names and one full path.
func describeLinears(layout *Layout) string {
	paths := layout.LinearPaths()
	if len(paths) == 0 {
		return "it has none"
	}
	names := map[string]bool{}
	for _, p := range paths {
		names[p[strings.LastIndex(p, ".")+1:]] = true
	}
	return fmt.Sprintf("its %d linear layers are named %s (paths such as %s)",
		len(paths), strings.Join(slices.Sorted(maps.Keys(names)), ", "), paths[0])
}

// SameTargets returns an error naming the first linear layer of layout that theirs (a saved
// configuration's targets, read from source) selects differently from adapted (the applied
// method's choice): both must adapt the same layers.
func SameTargets(layout *Layout, adapted func(path string) bool, theirs Targets, source string) error {
	for _, layer := range layout.Linears {
		ours, saved := adapted(layer.Path), theirs.Matches(layer)
		switch {
		case saved && !ours:
			return fmt.Errorf("%s: target_modules %s adapt %s, which the model's method leaves alone", source, theirs, layer.Path)
		case ours && !saved:
			return fmt.Errorf("%s: target_modules %s leave %s alone, which the model's method adapts", source, theirs, layer.Path)
		}
	}
	return nil
}

// PEFTPatternKey is the rank_pattern / alpha_pattern key Save writes for the layer at path of
// layout: a key that selects that layer alone under each of PEFT's matching rules, so that the
// file means the same in every PEFT version and whatever the keys' order. PEFT up to 0.14 takes
// the first key with re.match(rf".*\.{key}$", path), or a key equal to the path; since 0.15,
// re.match(rf"(.*\.)?({key})$", path). The key is the regex-escaped path without its first
// element ("layers\.0\.self_attn\.q_proj"), or a shorter escaped suffix after a dot, or the
// path itself (which PEFT up to 0.14 finds by name); it is an error when none selects the layer
// alone.
func PEFTPatternKey(layout *Layout, path string) (string, error) {
	var candidates []string
	for rest := path; ; {
		_, after, found := strings.Cut(rest, ".")
		if !found {
			break
		}
		candidates = append(candidates, regexp.QuoteMeta(after))
		rest = after
	}
	candidates = append(candidates, path)
	for _, key := range candidates {
		if selectsAlone(layout, key, path) {
			return key, nil
		}
	}
	return "", fmt.Errorf("no rank_pattern key selects layer %s alone under PEFT's matching rules: the other layers' paths overlap it", path)
}

// selectsAlone reports whether a pattern key selects the layer at path and no other linear layer
// of layout, under PEFT's rule up to 0.14 and since 0.15.
func selectsAlone(layout *Layout, key, path string) bool {
	before, err := regexp.Compile(`^.*\.(?:` + key + `)$`)
	if err != nil {
		return false
	}
	since := regexp.MustCompile(`^(?:.*\.)?(?:` + key + `)$`)
	if !since.MatchString(path) || !(before.MatchString(path) || key == path) {
		return false
	}
	for _, layer := range layout.Linears {
		if layer.Path != path && (since.MatchString(layer.Path) || before.MatchString(layer.Path) || key == layer.Path) {
			return false
		}
	}
	return true
}

// SameModules returns an error if the modules to save that a saved configuration names (theirs,
// read from source) select other variables of layout than the applied method's (ours).
func SameModules(layout *Layout, ours []*context.Variable, theirs []string, source string) error {
	var selected []*context.Variable
	if len(theirs) > 0 {
		var err error
		if selected, _, err = modulesToSave(layout, theirs); err != nil {
			return fmt.Errorf("%s: %w", source, err)
		}
	}
	want := map[*context.Variable]bool{}
	for _, v := range ours {
		want[v] = true
	}
	same := len(selected) == len(want)
	for _, v := range selected {
		same = same && want[v]
	}
	if !same {
		names := "none"
		if len(ours) > 0 {
			var paths []string
			for _, v := range ours {
				paths = append(paths, ScopeToPath(v.Scope())+"."+v.Name())
			}
			names = strings.Join(paths, ", ")
		}
		return fmt.Errorf("%s: modules_to_save %q select other modules than the model's method saves (%s)", source, theirs, names)
	}
	return nil
}

// MarshalJSON writes a pattern as a string and names as a list, like HF's target_modules.
func (t Targets) MarshalJSON() ([]byte, error) {
	if t.Pattern != "" {
		return json.Marshal(t.Pattern)
	}
	return json.Marshal(t.Names)
}

// UnmarshalJSON reads a string as a pattern and a list as names.
func (t *Targets) UnmarshalJSON(data []byte) error {
	var pattern string
	if err := json.Unmarshal(data, &pattern); err == nil {
		*t = Targets{Pattern: pattern}
		return nil
	}
	var names []string
	if err := json.Unmarshal(data, &names); err != nil {
		return fmt.Errorf("target modules must be a string or a list of strings: %w", err)
	}
	*t = Targets{Names: names}
	return nil
}

// ModulesToSave returns the variables of the base model that belong to the named modules, which a
// method trains and saves in full besides its own weights (Hugging Face's modules_to_save, e.g.
// a new classifier head "score"). A name matches a module whose path is the name or ends with "."
// + name. As in PEFT, names that match nothing are skipped (PEFT's classifiers list both
// "classifier" and "score"), with one log line, and it is an error only when none matches. Each
// variable is returned once, even when several names match it.
func ModulesToSave(layout *Layout, names []string) ([]*context.Variable, error) {
	selected, unmatched, err := modulesToSave(layout, names)
	if err == nil && len(unmatched) > 0 {
		log.Printf("peft: modules_to_save: %q match no module of the model and are skipped", unmatched)
	}
	return selected, err
}

// modulesToSave is ModulesToSave, returning the names that matched nothing instead of logging them.
func modulesToSave(layout *Layout, names []string) (selected []*context.Variable, unmatched []string, err error) {
	seen := map[*context.Variable]bool{}
	for _, name := range names {
		found := false
		for _, v := range layout.BaseVariables {
			if moduleMatches(ScopeToPath(v.Scope()), name) {
				found = true
				if !seen[v] {
					seen[v] = true
					selected = append(selected, v)
				}
			}
		}
		if !found {
			unmatched = append(unmatched, name)
		}
	}
	switch {
	case len(names) == 1 && len(selected) == 0:
		return nil, nil, fmt.Errorf("modules_to_save: %q matches no module of the model", names[0])
	case len(names) > 0 && len(selected) == 0:
		return nil, nil, fmt.Errorf("modules_to_save: none of %q matches a module of the model", names)
	}
	return selected, unmatched, nil
}

// moduleMatches reports whether a variable at the dotted scope path belongs to a module named
// name: some prefix of the path (ending at a dot) is name or ends with "."+name.
func moduleMatches(path, name string) bool {
	for prefix := path; prefix != ""; {
		if prefix == name || strings.HasSuffix(prefix, "."+name) {
			return true
		}
		i := strings.LastIndex(prefix, ".")
		if i < 0 {
			break
		}
		prefix = prefix[:i]
	}
	return false
}
