/*
 * Reads METEOR 1.5 `SCORE ||| ref ||| ... ||| hypothesis` lines and prints every reference the way METEOR's
 * scorer sees it under `-l en -norm` (the words it aligns), one per output line.
 *
 * Why a helper of our own: METEOR's scorer normalises each line with Normalizer.normalizeLine(line, langID, true)
 * and then lower-cases it (MeteorScorer.getMeteorStats, normalization level 2 = `-norm`), but exposes that text
 * only through its alignment file, which costs an alignment per line. lavis_ext needs the words to cut the
 * paraphrase table down to the phrases those references contain (lavis_ext/evaluation/meteor_paraphrases.py), and
 * only METEOR's own normaliser gives them exactly. Compiled once against meteor-1.5.jar into the cache directory.
 *
 * Usage: java -cp meteor-1.5.jar:<dir> MeteorNormalize [language] < score_lines.txt > references.txt   (UTF-8)
 */
import java.io.BufferedReader;
import java.io.BufferedWriter;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStreamWriter;
import java.io.Writer;
import java.nio.charset.StandardCharsets;

import edu.cmu.meteor.scorer.MeteorConfiguration;
import edu.cmu.meteor.util.Normalizer;

public class MeteorNormalize {
    public static void main(String[] args) throws IOException {
        MeteorConfiguration config = new MeteorConfiguration();
        config.setLanguage(args.length > 0 ? args[0] : "en");  // as `-l en` does
        int langID = config.getLangID();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        Writer out = new BufferedWriter(new OutputStreamWriter(System.out, StandardCharsets.UTF_8), 1 << 16);
        String line;
        while ((line = in.readLine()) != null) {
            // The same split and trim as Meteor's -stdio SCORE command: parts 1..n-2 are the references.
            String[] parts = line.split("\\|\\|\\|");
            for (int i = 1; i < parts.length - 1; i++) {
                out.write(Normalizer.normalizeLine(parts[i].trim(), langID, true).toLowerCase());
                out.write('\n');
            }
        }
        out.flush();
    }
}
