package llama_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft/llama"
)

// FuzzParseConfig: any config.json either is refused with an error or gives a configuration that
// validates, whose HFConfig parses back to the same configuration. Seeds: every family's fixture
// and stories260K's.
func FuzzParseConfig(f *testing.F) {
	paths, err := filepath.Glob(filepath.Join("testdata", "families", "*", "config.json"))
	require.NoError(f, err)
	paths = append(paths, filepath.Join("..", "stories260k", "testdata", "stories260K", "config.json"))
	for _, p := range paths {
		data, err := os.ReadFile(p)
		require.NoError(f, err)
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := llama.ParseConfig(data)
		if err != nil {
			return
		}
		require.NoError(t, cfg.Validate())
		fields, err := cfg.HFConfig()
		require.NoError(t, err)
		out, err := json.Marshal(fields)
		require.NoError(t, err)
		again, err := llama.ParseConfig(out)
		require.NoError(t, err, "%s", out)
		require.Equal(t, cfg, again)
	})
}
